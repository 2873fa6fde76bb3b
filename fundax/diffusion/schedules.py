"""Discrete-time variance-preserving noise schedules and the forward-process algebra on them.

This module owns the `Schedule` pytree (betas, alphas, cumulative alphas) built from a
diffusers-style scheduler config, and the pure functions every sampler, loss and RL objective
shares: noising (`add_noise`), the v-prediction target (`velocity`), turning a model output into
predictions of x0 and of the noise (`pred_x0_and_eps`) and the signal-to-noise ratio (`snr`),
and the inference timestep spacings diffusers' schedulers share (`spaced_timesteps`).

The arrays are computed on the host in float64 from float32 betas (diffusers' betas are float32
tensors) and stored as float32, so they agree with diffusers' float32 `alphas_cumprod` to a few
ulps (measured max abs diff <= 5e-7 over 1000 steps).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers' defaults for the schedule keys of a scheduler config.
_CONFIG_DEFAULTS = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    rescale_betas_zero_snr=False,
    set_alpha_to_one=True,
)


class Schedule(NamedTuple):
  """A discrete noise schedule; every field is a float32 array.

  Attributes:
    betas: [N] per-step noise variances beta_t.
    alphas: [N] 1 - beta_t.
    alphas_cumprod: [N] alpha-bar_t, the signal fraction of x_t = sqrt(ab) x0 + sqrt(1-ab) eps.
    final_alpha_cumprod: [] alpha-bar used by DDIM for the step past t=0 (diffusers'
      `set_alpha_to_one`: 1.0, or alphas_cumprod[0] as in the Stable Diffusion configs).
  """
  betas: Any
  alphas: Any
  alphas_cumprod: Any
  final_alpha_cumprod: Any

  @property
  def num_train_timesteps(self) -> int:
    """N, the number of training timesteps (static: it is an array shape)."""
    return self.betas.shape[0]


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Glide's squaredcos_cap_v2 betas, in Python floats exactly as diffusers' betas_for_alpha_bar."""
  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  n = num_train_timesteps
  return np.array(
      [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
      dtype=np.float64)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha-bar) so the last step has SNR 0."""
  abar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
  first, last = abar_sqrt[0], abar_sqrt[-1]
  abar_sqrt = (abar_sqrt - last) * (first / (first - last))
  abar = abar_sqrt**2
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return 1.0 - alphas


def make_schedule(num_train_timesteps: int = 1000,
                  beta_start: float = 0.0001,
                  beta_end: float = 0.02,
                  beta_schedule: str = "linear",
                  rescale_betas_zero_snr: bool = False,
                  set_alpha_to_one: bool = True) -> Schedule:
  """Builds a schedule exactly as diffusers' DDPM/DDIM/DPMSolver schedulers do.

  Args:
    num_train_timesteps: N, the number of diffusion steps the model was trained with.
    beta_start: first beta (for "scaled_linear", its square root is interpolated).
    beta_end: last beta.
    beta_schedule: one of "linear", "scaled_linear" (Stable Diffusion), "squaredcos_cap_v2".
    rescale_betas_zero_snr: rescale to zero terminal SNR (then alphas_cumprod[-1] == 0).
    set_alpha_to_one: DDIM's alpha-bar past the last step: 1.0 if True, else alphas_cumprod[0].

  Returns:
    A `Schedule` of float32 jax arrays.
  """
  n = num_train_timesteps
  if beta_schedule == "linear":
    betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
  elif beta_schedule == "scaled_linear":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64)**2
  elif beta_schedule == "squaredcos_cap_v2":
    betas = _cosine_betas(n)
  else:
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
  # diffusers holds float32 betas and derives everything from them; start from the same values.
  betas = betas.astype(np.float32).astype(np.float64)
  if rescale_betas_zero_snr:
    betas = _rescale_zero_terminal_snr(betas).astype(np.float32).astype(np.float64)
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  final = 1.0 if set_alpha_to_one else alphas_cumprod[0]
  log.debug("schedule %s n=%d zero_snr=%s: alpha-bar in [%g, %g]", beta_schedule, n,
                rescale_betas_zero_snr, alphas_cumprod[-1], alphas_cumprod[0])
  as32 = lambda a: jnp.asarray(np.asarray(a, np.float32))
  return Schedule(as32(betas), as32(alphas), as32(alphas_cumprod), as32(final))


def make_schedule_from_config(config: Mapping[str, Any]) -> Schedule:
  """Builds a schedule from a diffusers scheduler config dict or an ml_collections ConfigDict.

  Keys other than the schedule's own (clip_sample, steps_offset, prediction_type, ...) are
  ignored, so a diffusers `scheduler_config.json` can be passed as loaded.

  Args:
    config: mapping with any of num_train_timesteps, beta_start, beta_end, beta_schedule,
      rescale_betas_zero_snr, set_alpha_to_one; missing keys take diffusers' defaults.

  Returns:
    The `Schedule`.
  """
  if config.get("trained_betas") is not None:
    raise ValueError("trained_betas is not supported; give a named beta_schedule")
  kwargs = {k: config.get(k, default) for k, default in _CONFIG_DEFAULTS.items()}
  return make_schedule(**kwargs)


def expand_to(values, x):
  """Reshapes per-example values [B] (or a scalar) to broadcast against x [B, ...]."""
  values = jnp.asarray(values)
  if values.ndim == 0:
    return values
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def alpha_cumprod_at(schedule: Schedule, t, final_alpha_cumprod=None):
  """alpha-bar at integer timesteps t (scalar or [B]); t < 0 means "past the last step".

  Args:
    schedule: the schedule.
    t: int timesteps; negative entries take `final_alpha_cumprod`.
    final_alpha_cumprod: alpha-bar for t < 0; defaults to `schedule.final_alpha_cumprod`.

  Returns:
    float32 array shaped like t.
  """
  if final_alpha_cumprod is None:
    final_alpha_cumprod = schedule.final_alpha_cumprod
  t = jnp.asarray(t)
  inside = schedule.alphas_cumprod[jnp.maximum(t, 0)]
  return jnp.where(t >= 0, inside, final_alpha_cumprod)


def add_noise(schedule: Schedule, x0, noise, t):
  """Forward process q(x_t | x0): sqrt(ab_t) x0 + sqrt(1 - ab_t) noise.

  Args:
    schedule: the schedule.
    x0: clean samples [B, ...].
    noise: standard normal noise shaped like x0.
    t: int timesteps, scalar or [B], in [0, N).

  Returns:
    x_t shaped like x0.
  """
  abar = expand_to(schedule.alphas_cumprod[t], x0).astype(x0.dtype)
  return abar**0.5 * x0 + (1 - abar)**0.5 * noise


def velocity(schedule: Schedule, x0, noise, t):
  """The v-prediction target sqrt(ab_t) noise - sqrt(1 - ab_t) x0 (Salimans & Ho 2022).

  Args:
    schedule: the schedule.
    x0: clean samples [B, ...].
    noise: the noise used to make x_t.
    t: int timesteps, scalar or [B].

  Returns:
    v shaped like x0.
  """
  abar = expand_to(schedule.alphas_cumprod[t], x0).astype(x0.dtype)
  return abar**0.5 * noise - (1 - abar)**0.5 * x0


def pred_x0_and_eps(schedule: Schedule, model_output, x_t, t, prediction_type: str = "epsilon"):
  """Converts a model output at timestep t into predictions of x0 and of the noise.

  Args:
    schedule: the schedule.
    model_output: the denoiser's output [B, ...].
    x_t: the noisy input [B, ...].
    t: int timesteps, scalar or [B], in [0, N).
    prediction_type: what the model predicts: "epsilon", "v_prediction" or "sample" (x0).

  Returns:
    (pred_x0, pred_eps), each shaped like x_t.
  """
  abar = expand_to(schedule.alphas_cumprod[t], x_t)
  beta_prod = 1 - abar
  if prediction_type == "epsilon":
    eps = model_output
    x0 = (x_t - beta_prod**0.5 * model_output) / abar**0.5
  elif prediction_type == "v_prediction":
    x0 = abar**0.5 * x_t - beta_prod**0.5 * model_output
    eps = abar**0.5 * model_output + beta_prod**0.5 * x_t
  elif prediction_type == "sample":
    x0 = model_output
    eps = (x_t - abar**0.5 * model_output) / beta_prod**0.5
  else:
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
  return x0, eps


def snr(schedule: Schedule, t):
  """Signal-to-noise ratio ab_t / (1 - ab_t) at int timesteps t (for min-SNR loss weights).

  Args:
    schedule: the schedule.
    t: int timesteps, scalar or [B].

  Returns:
    float32 array shaped like t (0 at the last step of a zero-terminal-SNR schedule).
  """
  abar = schedule.alphas_cumprod[t]
  return abar / (1 - abar)


def spaced_timesteps(num_points: int, num_train_timesteps: int, spacing: str,
                     steps_offset: int = 0) -> np.ndarray:
  """`num_points` descending int64 timesteps spaced as diffusers' DDPM and DDIM schedulers do.

  Args:
    num_points: how many timesteps.
    num_train_timesteps: N of the schedule.
    spacing: "leading" (multiples of N // num_points, plus `steps_offset`), "trailing" (ending
      at N - 1) or "linspace" (rounded linspace over [0, N - 1]).
    steps_offset: added to "leading" timesteps (1 in the Stable Diffusion configs).

  Returns:
    int64 numpy array [num_points], descending.
  """
  n_train, n = num_train_timesteps, num_points
  if spacing == "linspace":
    return np.linspace(0, n_train - 1, n).round()[::-1].astype(np.int64)
  if spacing == "leading":
    return (np.arange(0, n) * (n_train // n)).round()[::-1].astype(np.int64) + steps_offset
  if spacing == "trailing":
    return np.round(np.arange(n_train, 0, -n_train / n)).astype(np.int64) - 1
  raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
