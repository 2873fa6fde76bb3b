"""Inference timesteps and the jittable sampling loop (DDPM, DDIM, DPM-Solver++(2M)) with CFG.

This module owns (1) `make_timesteps`, which mirrors each diffusers scheduler's
`set_timesteps` (and its notion of the previous timestep) on the host, and (2) `sample_loop`,
one pure function that runs the whole reverse process as a `lax.scan` over those timesteps
with classifier-free guidance, returning the final latents or, for DDPO, the full trajectory
with exact per-step log-probs.

Static vs traced: the sampler, the number of steps and the timestep spacing shape the
computation and are static; guidance_scale and eta are traced, so changing them between calls
does not recompile. There are no host callbacks: the loop works under a user's jit and vmap.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fundax.diffusion import dpm_solver
from fundax.diffusion import steps

SAMPLERS = ("ddpm", "ddim", "dpm_solver")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers' default timestep_spacing per scheduler.
_DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "dpm_solver": "linspace"}


class Trajectory(NamedTuple):
  """A sampled reverse-diffusion trajectory (batch-first inside each step).

  Attributes:
    latents: [T + 1, B, ...]: x_T, then the sample after each step; latents[-1] is the result.
    log_probs: [T, B] float32: log p(latents[i + 1] | latents[i]) of step i (0 where the step
      is deterministic: DDIM with eta=0, DPM-Solver, the last DDPM step).
    timesteps: [T] int32 timestep t of step i.
    prev_timesteps: [T] int32 the t_prev that step i's step function was called with.
  """
  latents: Any
  log_probs: Any
  timesteps: Any
  prev_timesteps: Any


def make_timesteps(sampler: str, num_steps: int, num_train_timesteps: int = 1000, *,
                   timestep_spacing: str | None = None, steps_offset: int = 0):
  """Inference timesteps and previous timesteps exactly as diffusers' `set_timesteps`.

  Args:
    sampler: "ddpm", "ddim" or "dpm_solver".
    num_steps: number of inference steps T.
    num_train_timesteps: N of the schedule.
    timestep_spacing: "leading", "trailing" or "linspace"; None takes the scheduler's diffusers
      default ("leading" for DDPM/DDIM, "linspace" for DPM-Solver).
    steps_offset: added to "leading" timesteps (1 in the Stable Diffusion configs).

  Returns:
    (timesteps [T], prev_timesteps [T]) int32 numpy arrays, descending. prev_timesteps is what
    the scheduler steps to: the next timestep (-1 after the last) for DDPM and DPM-Solver,
    t - N // T for DDIM (negative past the end).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
  if not 0 < num_steps <= num_train_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
  spacing = timestep_spacing or _DEFAULT_SPACING[sampler]
  n_train, n = num_train_timesteps, num_steps
  if sampler == "dpm_solver":
    # DPMSolverMultistepScheduler spaces num_steps + 1 points and drops the last (t = 0).
    if spacing == "linspace":
      ts = np.linspace(0, n_train - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
      ratio = n_train // (n + 1)
      ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
      ts = np.arange(n_train, 0, -n_train / n).round().astype(np.int64) - 1
    else:
      raise ValueError(f"unknown timestep_spacing {spacing!r}")
  else:
    if spacing == "linspace":
      ts = np.linspace(0, n_train - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "leading":
      ts = (np.arange(0, n) * (n_train // n)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
      ts = np.round(np.arange(n_train, 0, -n_train / n)).astype(np.int64) - 1
    else:
      raise ValueError(f"unknown timestep_spacing {spacing!r}")
  if sampler == "ddim":
    prev = ts - n_train // n
  else:
    prev = np.concatenate([ts[1:], [-1]])
  return ts.astype(np.int32), prev.astype(np.int32)


def guided_model_output(denoise_fn: Callable, x, t, cond, uncond, guidance_scale):
  """Classifier-free guidance: one denoiser call on the [uncond, cond] batch.

  Args:
    denoise_fn: pure `(x [2B, ...], t [2B] int32, embeddings) -> model_output [2B, ...]`.
    x: current latents [B, ...].
    t: int timestep (scalar).
    cond: conditioning pytree, leading axis B (e.g. text token states [B, L, D]).
    uncond: the unconditional ("empty prompt") pytree shaped like cond, or None to skip CFG.
    guidance_scale: traced scalar w; out = out_u + w (out_c - out_u).

  Returns:
    The guided model output [B, ...].
  """
  batch = x.shape[0]
  if uncond is None:
    return denoise_fn(x, jnp.full((batch,), t, jnp.int32), cond)
  both = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
  out = denoise_fn(jnp.concatenate([x, x], axis=0), jnp.full((2 * batch,), t, jnp.int32), both)
  out_u, out_c = out[:batch], out[batch:]
  w = jnp.asarray(guidance_scale, out.dtype)
  return out_u + w * (out_c - out_u)


def sample_loop(denoise_fn: Callable, schedule, x_T, cond, uncond, key, *, sampler: str,
                num_steps: int, guidance_scale=1.0, eta=0.0, prediction_type: str = "epsilon",
                return_trajectory: bool = False, timestep_spacing: str | None = None,
                steps_offset: int = 0):
  """Runs the reverse diffusion from x_T to x_0 as one `lax.scan` (jit- and vmap-friendly).

  Step i draws its noise from `jax.random.fold_in(key, i)`, so a run is reproducible from its
  key alone and a Python loop over the step functions with the same keys gives the same result.

  Args:
    denoise_fn: pure `(x, t [B'] int32, embeddings) -> model_output`, e.g. a bound UNet apply.
    schedule: the `Schedule`.
    x_T: initial noise [B, ...].
    cond: conditioning pytree with leading axis B.
    uncond: unconditional pytree shaped like cond, or None for no classifier-free guidance.
    key: PRNG key for the stochastic samplers (DDPM, DDIM with eta > 0).
    sampler: "ddpm", "ddim" or "dpm_solver" (static).
    num_steps: number of inference steps T (static).
    guidance_scale: CFG weight (traced scalar).
    eta: DDIM stochasticity (traced scalar); ignored by the other samplers.
    prediction_type: what denoise_fn predicts: "epsilon", "v_prediction" or "sample" (static).
    return_trajectory: also return the `Trajectory` (static).
    timestep_spacing: see `make_timesteps` (static).
    steps_offset: see `make_timesteps` (static).

  Returns:
    The final latents [B, ...] shaped like x_T, or (final latents, Trajectory) when
    return_trajectory.
  """
  ts, prev_ts = make_timesteps(sampler, num_steps, schedule.num_train_timesteps,
                               timestep_spacing=timestep_spacing, steps_offset=steps_offset)
  # DPM-Solver's history: the previous step's timestep, and whether step i is second order
  # (not the first step, which has no history, nor the last, which steps to sigma 0).
  last_ts = np.concatenate([ts[:1], ts[:-1]])
  second_order = np.arange(num_steps) > 0
  second_order[-1] = False
  xs = (np.arange(num_steps, dtype=np.int32), ts, prev_ts, last_ts, second_order)

  def body(carry, step_xs):
    x, prev_x0 = carry
    i, t, t_prev, t_last, second = step_xs
    model_output = guided_model_output(denoise_fn, x, t, cond, uncond, guidance_scale)
    rng_step = jax.random.fold_in(key, i)
    if sampler == "ddim":
      x_next, log_prob = steps.ddim_step(schedule, model_output, t, t_prev, x, eta, key=rng_step,
                                         prediction_type=prediction_type)
    elif sampler == "ddpm":
      x_next, log_prob = steps.ddpm_step(schedule, model_output, t, t_prev, x, key=rng_step,
                                         prediction_type=prediction_type)
    else:
      x_next, prev_x0 = dpm_solver.dpm_solver_step(schedule, model_output, t, t_prev, x, prev_x0,
                                                   t_last, second, prediction_type)
      log_prob = jnp.zeros((x.shape[0],), jnp.float32)
    return (x_next, prev_x0), ((x_next, log_prob) if return_trajectory else None)

  # Only DPM-Solver carries a history; the others carry an empty placeholder.
  init_history = jnp.zeros(x_T.shape, jnp.float32) if sampler == "dpm_solver" else ()
  (x_0, _), ys = jax.lax.scan(body, (x_T, init_history), xs)
  if not return_trajectory:
    return x_0
  latents, log_probs = ys
  trajectory = Trajectory(
      latents=jnp.concatenate([x_T[None], latents], axis=0), log_probs=log_probs,
      timesteps=jnp.asarray(ts), prev_timesteps=jnp.asarray(prev_ts))
  return x_0, trajectory
