"""The sampler registry: every reverse-diffusion sampler fundax can run, by name.

This module owns the `Sampler` protocol and the table that `sample_loop`, `make_timesteps`,
the configs' checks, the CLI's `--sampler` and the RLHF rollouts read. Adding a sampler is one
new file: a class implementing `Sampler` (and `GaussianSampler` when its stochastic steps are
Gaussian with an exact log-density, which is what RLHF rollouts need) and a call
`register_sampler(MySampler())` at import. The built-in ones register themselves the same way:
DDPM and DDIM in `fundax.diffusion.steps`, DPM-Solver++(2M) in `fundax.diffusion.dpm_solver`
(imported by `fundax.diffusion`, so they are registered before anything can look them up).

A sampler is a static Python object (closed over by jit, never traced): its `step` is the body
of the `lax.scan` and must be a pure function of arrays.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

_SAMPLERS: dict[str, Sampler] = {}


class Sampler(Protocol):
  """A reverse-diffusion sampler.

  Attributes:
    name: its registry name (`--sampler`, `sample.sampler`, `rollout.sampler`).
    default_spacing: its diffusers scheduler's default `timestep_spacing`, used when the
      scheduler config names none.
    exact_log_probs: whether `step` returns the exact log-density of each stochastic step (a
      `GaussianSampler`); RLHF rollouts accept only such samplers.
  """
  name: str
  default_spacing: str
  exact_log_probs: bool

  def timesteps(self, num_steps: int, num_train_timesteps: int, spacing: str,
                steps_offset: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps [T], previous timesteps [T]) int numpy arrays, descending, as diffusers."""

  def init_carry(self, x_T) -> Any:
    """What the sampler carries from step to step (a multistep history), given x_T."""

  def step(self, schedule, model_output, t, t_prev, x_t, carry, *, key, eta,
           prediction_type: str) -> tuple[Any, Any, Any]:
    """One step from t to t_prev: (x_{t_prev} like x_t, log_prob [B] float32, new carry).

    The log-prob is 0 where a step is deterministic; `key` draws the step's noise.
    """


class GaussianSampler(Sampler, Protocol):
  """A sampler whose every step is x_{t_prev} ~ N(mean, std^2 I): it can score a sample.

  RLHF's policy update rescores the rollouts' steps under new params with `moments`.
  """

  def moments(self, schedule, model_output, t, t_prev, x_t, eta,
              prediction_type: str) -> tuple[Any, Any]:
    """(mean [B, ...] float32, std broadcastable to x_t) of the step; t may be [B]."""


def register_sampler(sampler: Sampler) -> Sampler:
  """Adds `sampler` to the registry under `sampler.name`; returns it.

  Raises:
    ValueError: the name is taken, or the sampler lacks a protocol member.
  """
  missing = [m for m in ("name", "default_spacing", "exact_log_probs", "timesteps",
                         "init_carry", "step") if not hasattr(sampler, m)]
  if getattr(sampler, "exact_log_probs", False) and not hasattr(sampler, "moments"):
    missing.append("moments (exact_log_probs is True)")
  if missing:
    raise ValueError(f"sampler {sampler!r} lacks {missing} of fundax.diffusion.registry.Sampler")
  if sampler.name in _SAMPLERS:
    raise ValueError(f"a sampler named {sampler.name!r} is already registered")
  _SAMPLERS[sampler.name] = sampler
  return sampler


def sampler_names() -> tuple[str, ...]:
  """The registered samplers' names, in registration order."""
  return tuple(_SAMPLERS)


def log_prob_sampler_names() -> tuple[str, ...]:
  """The registered samplers with exact log-probs (those RLHF rollouts can use)."""
  return tuple(name for name, s in _SAMPLERS.items() if s.exact_log_probs)


def get_sampler(name: str, *, need_log_probs: bool = False) -> Sampler:
  """The registered sampler `name`.

  Args:
    name: a registered name.
    need_log_probs: also require exact log-probs (a `GaussianSampler`).

  Raises:
    ValueError: naming the registered samplers that would do.
  """
  names = log_prob_sampler_names() if need_log_probs else sampler_names()
  if name not in names:
    kind = "a sampler with exact log-probs" if need_log_probs else "a sampler"
    raise ValueError(f"{kind} must be one of {names}, got {name!r} (samplers register with "
                     "fundax.diffusion.registry.register_sampler)")
  return _SAMPLERS[name]
