"""Single reverse-diffusion steps with Gaussian transitions: DDPM and DDIM (with eta).

This module owns the one-step update x_t -> x_{t_prev} and the exact log-density of that
update, in the jannerm/ddpo style: the same function samples (when given `key` or `noise`) or
scores a given `prev_sample`, and in both cases returns log p(prev_sample | x_t) under the
step's Gaussian N(mean, std^2 I). Means and stds follow diffusers' DDPMScheduler
(variance_type "fixed_small") and DDIMScheduler exactly, without x0 clipping or thresholding
(latent diffusion configs set clip_sample=False).

Log-prob convention: summed over all non-batch dims, one value per example ([B]). Where the
step is deterministic (std == 0: DDIM with eta=0, the last DDPM step, the last DDIM step with
set_alpha_to_one) the density is a point mass and the log-prob is defined as 0.0, so a
trajectory's log-prob is the sum over its stochastic steps only.

`DDPM` and `DDIM` are these steps as registered samplers (`fundax.diffusion.registry`), with
diffusers' inference timesteps.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fundax.diffusion import registry
from fundax.diffusion import schedules

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(x, mean, std):
  """log N(x; mean, std^2 I) summed over non-batch dims; 0 where std == 0.

  Args:
    x: samples [B, ...].
    mean: means, broadcastable to x.
    std: standard deviations, a scalar or broadcastable to x (e.g. [B, 1, 1, 1]).

  Returns:
    float32 log-probs [B].
  """
  x = x.astype(jnp.float32)
  stochastic = jnp.broadcast_to(std > 0, x.shape)
  # A safe std keeps the untaken branch finite, so gradients through jnp.where stay finite.
  safe_std = jnp.where(std > 0, std, 1.0)
  z = (x - mean) / safe_std
  per_dim = -0.5 * z**2 - jnp.log(safe_std) - _LOG_SQRT_2PI
  per_dim = jnp.where(stochastic, per_dim, 0.0)
  return per_dim.reshape(x.shape[0], -1).sum(axis=-1)


def _finish_step(mean, std, x_t, key, noise, prev_sample):
  """Samples from or scores N(mean, std^2); exactly one of key, noise, prev_sample is given."""
  given = sum(v is not None for v in (key, noise, prev_sample))
  if given != 1:
    raise ValueError("give exactly one of key (sample), noise (sample with this noise) or "
                     f"prev_sample (score it); got {given}")
  if prev_sample is None:
    if noise is None:
      noise = jax.random.normal(key, x_t.shape, jnp.float32)
    prev_sample = (mean + std * noise).astype(x_t.dtype)
  return prev_sample, gaussian_log_prob(prev_sample, mean, std)


def ddpm_moments(schedule, model_output, t, t_prev, x_t, prediction_type="epsilon"):
  """Mean and std of the DDPM posterior q(x_{t_prev} | x_t, x0 = pred_x0).

  Args:
    schedule: the `Schedule`.
    model_output: denoiser output at (x_t, t) [B, ...].
    t: int timestep, scalar or [B].
    t_prev: the next (smaller) timestep of the inference schedule; < 0 after the last step,
      where alpha-bar is 1 (diffusers' DDPMScheduler).
    x_t: current sample [B, ...].
    prediction_type: "epsilon", "v_prediction" or "sample".

  Returns:
    (mean [B, ...] float32, std broadcastable to x_t, pred_x0 [B, ...]).
  """
  x_t32 = x_t.astype(jnp.float32)
  pred_x0, _ = schedules.pred_x0_and_eps(
      schedule, model_output.astype(jnp.float32), x_t32, t, prediction_type)
  abar_t = schedules.expand_to(schedules.alpha_cumprod_at(schedule, t), x_t)
  abar_prev = schedules.expand_to(schedules.alpha_cumprod_at(schedule, t_prev, 1.0), x_t)
  beta_prod_t = 1 - abar_t
  beta_prod_prev = 1 - abar_prev
  alpha_t = abar_t / abar_prev
  beta_t = 1 - alpha_t
  # Formula (7) of Ho et al. 2020, in diffusers' operation order for float32 parity.
  x0_coeff = (abar_prev**0.5 * beta_t) / beta_prod_t
  xt_coeff = alpha_t**0.5 * beta_prod_prev / beta_prod_t
  mean = x0_coeff * pred_x0 + xt_coeff * x_t32
  variance = beta_prod_prev / beta_prod_t * beta_t
  # After the last step variance is exactly 0 (abar_prev = 1); diffusers adds noise * 1e-10
  # there when t > 0, below float32 resolution of the sample, so std 0 is the same step.
  std = jnp.maximum(variance, 0.0)**0.5
  return mean, std, pred_x0


def ddim_moments(schedule, model_output, t, t_prev, x_t, eta, prediction_type="epsilon"):
  """Mean and std of the DDIM step (Song et al. 2021, eqs. 12 and 16).

  Args:
    schedule: the `Schedule`.
    model_output: denoiser output at (x_t, t) [B, ...].
    t: int timestep, scalar or [B].
    t_prev: t - N // num_steps as in diffusers; < 0 uses `schedule.final_alpha_cumprod`.
    x_t: current sample [B, ...].
    eta: traced scalar; 0 is deterministic DDIM, 1 matches the DDPM posterior variance.
    prediction_type: "epsilon", "v_prediction" or "sample".

  Returns:
    (mean [B, ...] float32, std broadcastable to x_t, pred_x0 [B, ...]).
  """
  x_t32 = x_t.astype(jnp.float32)
  pred_x0, pred_eps = schedules.pred_x0_and_eps(
      schedule, model_output.astype(jnp.float32), x_t32, t, prediction_type)
  abar_t = schedules.expand_to(schedules.alpha_cumprod_at(schedule, t), x_t)
  abar_prev = schedules.expand_to(schedules.alpha_cumprod_at(schedule, t_prev), x_t)
  beta_prod_t = 1 - abar_t
  beta_prod_prev = 1 - abar_prev
  variance = (beta_prod_prev / beta_prod_t) * (1 - abar_t / abar_prev)
  std = jnp.asarray(eta, jnp.float32) * variance**0.5
  # 1 - abar_prev - std^2 is exactly 0 at eta = 1 on a zero-terminal-SNR schedule's first
  # step (abar_t = 0) and rounds to -6e-8 in float32: clamp, or the sample is NaN.
  direction = jnp.maximum(1 - abar_prev - std**2, 0.0)**0.5 * pred_eps
  mean = abar_prev**0.5 * pred_x0 + direction
  return mean, std, pred_x0


def ddpm_step(schedule, model_output, t, t_prev, x_t, *, key=None, noise=None, prev_sample=None,
              prediction_type="epsilon"):
  """One ancestral DDPM step that samples (key or noise given) or scores prev_sample.

  Args:
    schedule: the `Schedule`.
    model_output: denoiser output at (x_t, t) [B, ...] (after classifier-free guidance).
    t: int timestep, scalar or [B].
    t_prev: next timestep of the inference schedule (-1 after the last).
    x_t: current sample [B, ...].
    key: PRNG key to draw the step's noise.
    noise: standard normal noise shaped like x_t, instead of key (for parity tests, CycleDiffusion).
    prev_sample: a sample to score instead of drawing one (DDPO's policy log-prob).
    prediction_type: "epsilon", "v_prediction" or "sample".

  Returns:
    (prev_sample shaped and typed like x_t, log_prob [B] float32).
  """
  mean, std, _ = ddpm_moments(schedule, model_output, t, t_prev, x_t, prediction_type)
  return _finish_step(mean, std, x_t, key, noise, prev_sample)


def ddim_step(schedule, model_output, t, t_prev, x_t, eta, *, key=None, noise=None,
              prev_sample=None, prediction_type="epsilon"):
  """One DDIM step with stochasticity eta that samples (key or noise given) or scores prev_sample.

  Args:
    schedule: the `Schedule`.
    model_output: denoiser output at (x_t, t) [B, ...] (after classifier-free guidance).
    t: int timestep, scalar or [B].
    t_prev: t - N // num_steps (negative past the last step).
    x_t: current sample [B, ...].
    eta: traced scalar in [0, 1]; with eta == 0 the step is deterministic and log_prob is 0.
    key: PRNG key to draw the step's noise.
    noise: standard normal noise shaped like x_t, instead of key (diffusers' `variance_noise`).
    prev_sample: a sample to score instead of drawing one (DDPO's policy log-prob).
    prediction_type: "epsilon", "v_prediction" or "sample".

  Returns:
    (prev_sample shaped and typed like x_t, log_prob [B] float32).
  """
  mean, std, _ = ddim_moments(schedule, model_output, t, t_prev, x_t, eta, prediction_type)
  return _finish_step(mean, std, x_t, key, noise, prev_sample)


@dataclasses.dataclass(frozen=True)
class DDPM:
  """diffusers' DDPMScheduler as a sampler: ancestral steps to the next inference timestep."""
  name: str = "ddpm"
  default_spacing: str = "leading"
  exact_log_probs: bool = True

  def timesteps(self, num_steps, num_train_timesteps, spacing, steps_offset):
    ts = schedules.spaced_timesteps(num_steps, num_train_timesteps, spacing, steps_offset)
    return ts, np.concatenate([ts[1:], [-1]])

  def init_carry(self, x_T):
    return ()

  def moments(self, schedule, model_output, t, t_prev, x_t, eta, prediction_type):
    del eta  # DDPM's variance is the posterior's
    mean, std, _ = ddpm_moments(schedule, model_output, t, t_prev, x_t, prediction_type)
    return mean, std

  def step(self, schedule, model_output, t, t_prev, x_t, carry, *, key, eta, prediction_type):
    del eta
    x_prev, log_prob = ddpm_step(schedule, model_output, t, t_prev, x_t, key=key,
                                 prediction_type=prediction_type)
    return x_prev, log_prob, carry


@dataclasses.dataclass(frozen=True)
class DDIM:
  """diffusers' DDIMScheduler as a sampler; eta (traced) sets its stochasticity."""
  name: str = "ddim"
  default_spacing: str = "leading"
  exact_log_probs: bool = True

  def timesteps(self, num_steps, num_train_timesteps, spacing, steps_offset):
    ts = schedules.spaced_timesteps(num_steps, num_train_timesteps, spacing, steps_offset)
    return ts, ts - num_train_timesteps // num_steps

  def init_carry(self, x_T):
    return ()

  def moments(self, schedule, model_output, t, t_prev, x_t, eta, prediction_type):
    mean, std, _ = ddim_moments(schedule, model_output, t, t_prev, x_t, eta, prediction_type)
    return mean, std

  def step(self, schedule, model_output, t, t_prev, x_t, carry, *, key, eta, prediction_type):
    x_prev, log_prob = ddim_step(schedule, model_output, t, t_prev, x_t, eta, key=key,
                                 prediction_type=prediction_type)
    return x_prev, log_prob, carry


registry.register_sampler(DDPM())
registry.register_sampler(DDIM())
