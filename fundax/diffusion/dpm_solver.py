"""DPM-Solver++(2M): the deterministic multistep ODE solver of Lu et al. 2022 (arXiv 2211.01095).

This module owns one step of diffusers' DPMSolverMultistepScheduler with its default settings:
algorithm_type "dpmsolver++" (integrates the data-prediction model), solver_order 2,
solver_type "midpoint", final_sigmas_type "zero" and lower_order_final True. The multistep
history (the previous x0 prediction and its timestep) is passed in and returned explicitly, so
the step is a pure function a `lax.scan` can carry.

The first step and the last step are first order (DDIM-like), as in diffusers: the first has no
history, and the last steps to sigma 0, where diffusers always drops to first order. The step
is deterministic, so it has no log-prob; samplers report 0 for it. `DPMSolver` is the
registered sampler (`fundax.diffusion.registry`) built on the step.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from fundax.diffusion import registry
from fundax.diffusion import schedules

# diffusers replaces a zero alpha-bar (zero-terminal-SNR schedules) by the smallest float16
# subnormal, so the first sigma is finite.
_ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def dpm_sigma_at(schedule, t):
  """The solver's sigma = sqrt((1 - ab_t) / ab_t) at int timesteps t; 0 for t < 0 (the end).

  Args:
    schedule: the `Schedule`.
    t: int timesteps, scalar or [B].

  Returns:
    float32 array shaped like t.
  """
  abar = schedule.alphas_cumprod
  abar = jnp.where(abar == 0, _ZERO_SNR_ALPHA_CUMPROD, abar)
  t = jnp.asarray(t)
  sigma = ((1 - abar[jnp.maximum(t, 0)]) / abar[jnp.maximum(t, 0)])**0.5
  return jnp.where(t >= 0, sigma, 0.0)


def _alpha_sigma_lambda(sigma):
  """(alpha_t, sigma_t, lambda_t = log alpha_t - log sigma_t) from the solver's sigma."""
  alpha_t = 1 / (sigma**2 + 1)**0.5
  sigma_t = sigma * alpha_t
  # lambda is +inf at sigma 0 (the final step), where only the first-order update is used.
  safe_sigma_t = jnp.where(sigma_t > 0, sigma_t, 1.0)
  lam = jnp.where(sigma_t > 0, jnp.log(alpha_t) - jnp.log(safe_sigma_t), jnp.inf)
  return alpha_t, sigma_t, lam


def dpm_solver_step(schedule, model_output, t, t_prev, x_t, prev_x0, t_last, second_order,
                    prediction_type="epsilon"):
  """One DPM-Solver++(2M) step from timestep t to t_prev.

  Args:
    schedule: the `Schedule`.
    model_output: denoiser output at (x_t, t) [B, ...] (after classifier-free guidance).
    t: int timestep, scalar or [B].
    t_prev: the next timestep of the inference schedule; -1 after the last (sigma 0).
    x_t: current sample [B, ...].
    prev_x0: the x0 prediction of the previous step [B, ...] (ignored when not second_order).
    t_last: the timestep of the previous step (ignored when not second_order).
    second_order: bool (traced is fine); False on the first and the last step.
    prediction_type: "epsilon", "v_prediction" or "sample".

  Returns:
    (prev_sample shaped and typed like x_t, x0_pred [B, ...] float32: the next step's prev_x0).
  """
  x_t32 = x_t.astype(jnp.float32)
  model_output = model_output.astype(jnp.float32)
  sigma_at = lambda ts: schedules.expand_to(dpm_sigma_at(schedule, ts), x_t)
  alpha_s0, sigma_s0, lambda_s0 = _alpha_sigma_lambda(sigma_at(t))
  alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigma_at(t_prev))
  _, _, lambda_s1 = _alpha_sigma_lambda(sigma_at(t_last))
  # The data prediction, with the solver's alpha/sigma (not sqrt(alpha-bar)) as diffusers does.
  if prediction_type == "epsilon":
    x0 = (x_t32 - sigma_s0 * model_output) / alpha_s0
  elif prediction_type == "v_prediction":
    x0 = alpha_s0 * x_t32 - sigma_s0 * model_output
  elif prediction_type == "sample":
    x0 = model_output
  else:
    raise ValueError(f"prediction_type must be one of {schedules.PREDICTION_TYPES}, "
                     f"got {prediction_type!r}")
  h = lambda_t - lambda_s0
  # exp(-h) - 1 with h = +inf at the final step is exactly -1 (jnp.exp(-inf) == 0).
  expm = jnp.exp(-h) - 1.0
  first = (sigma_t / sigma_s0) * x_t32 - (alpha_t * expm) * x0
  # Midpoint second-order correction; r0 is only meaningful when second_order, so keep the
  # untaken branch finite (h0 = 0 on the first step, h = inf on the last).
  safe = jnp.logical_and(second_order, jnp.isfinite(h))
  r0 = jnp.where(safe, (lambda_s0 - lambda_s1) / jnp.where(safe, h, 1.0), 1.0)
  d1 = (1.0 / r0) * (x0 - prev_x0)
  second = first - 0.5 * (alpha_t * expm) * d1
  prev_sample = jnp.where(second_order, second, first)
  return prev_sample.astype(x_t.dtype), x0


@dataclasses.dataclass(frozen=True)
class DPMSolver:
  """diffusers' DPMSolverMultistepScheduler (defaults above) as a sampler; deterministic."""
  name: str = "dpm_solver"
  default_spacing: str = "linspace"
  exact_log_probs: bool = False

  def timesteps(self, num_steps, num_train_timesteps, spacing, steps_offset):
    if spacing == "trailing":
      ts = schedules.spaced_timesteps(num_steps, num_train_timesteps, spacing)
    else:  # it spaces num_steps + 1 points and drops the last (t = 0)
      ts = schedules.spaced_timesteps(num_steps + 1, num_train_timesteps, spacing,
                                      steps_offset)[:-1]
    return ts, np.concatenate([ts[1:], [-1]])

  def init_carry(self, x_T):
    """The history: the previous x0 prediction, its timestep, and whether there is one."""
    return jnp.zeros(x_T.shape, jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), bool)

  def step(self, schedule, model_output, t, t_prev, x_t, carry, *, key, eta, prediction_type):
    del key, eta
    prev_x0, t_last, has_history = carry
    # Second order but on the first step (no history) and the last (t_prev < 0: sigma 0).
    second_order = jnp.logical_and(has_history, t_prev >= 0)
    x_prev, x0 = dpm_solver_step(schedule, model_output, t, t_prev, x_t, prev_x0, t_last,
                                 second_order, prediction_type)
    log_prob = jnp.zeros((x_t.shape[0],), jnp.float32)
    return x_prev, log_prob, (x0, jnp.asarray(t, jnp.int32), jnp.ones((), bool))


registry.register_sampler(DPMSolver())
