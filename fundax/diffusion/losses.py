"""Denoising training losses: targets for each prediction type, min-SNR-gamma weights.

This module owns the per-example diffusion loss that the LDM train step minimises and that the
RL code reuses with per-example weights (reward-weighted likelihood). Losses are returned per
example, [B] float32, so callers choose how to reduce them (a mean over a sharded batch is just
`.mean()`).
"""

from __future__ import annotations

import jax.numpy as jnp

from fundax.diffusion import schedules
from fundax.diffusion.schedules import Schedule


def training_target(schedule: Schedule, x0, noise, t, prediction_type: str = "epsilon"):
  """What the denoiser should output for x_t = add_noise(x0, noise, t).

  Args:
    schedule: the schedule.
    x0: clean latents [B, ...].
    noise: the standard normal noise that made x_t.
    t: int timesteps [B].
    prediction_type: "epsilon" (the noise), "v_prediction" (the velocity) or "sample" (x0).

  Returns:
    The target, shaped like x0.
  """
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "v_prediction":
    return schedules.velocity(schedule, x0, noise, t)
  if prediction_type == "sample":
    return x0
  raise ValueError(f"prediction_type must be one of {schedules.PREDICTION_TYPES}, "
                   f"got {prediction_type!r}")


def min_snr_weights(schedule: Schedule, t, gamma: float, prediction_type: str = "epsilon"):
  """Min-SNR-gamma loss weights (Hang et al. 2023), expressed for each prediction type.

  The paper weights the x0-space loss by min(SNR, gamma). An epsilon-space loss equals the
  x0-space loss times 1 / SNR, and a v-space loss equals it times 1 / (SNR + 1), so those
  targets get min(SNR, gamma) / SNR and min(SNR, gamma) / (SNR + 1) respectively.

  Args:
    schedule: the schedule.
    t: int timesteps [B].
    gamma: the clamp (5.0 in the paper); must be > 0.
    prediction_type: "epsilon", "v_prediction" or "sample".

  Returns:
    float32 weights [B]. Where SNR is 0 (the last step of a zero-terminal-SNR schedule) the
    epsilon weight would be 0/0; it is 1 there, as in diffusers' training scripts.
  """
  if gamma <= 0:
    raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
  snr = schedules.snr(schedule, t).astype(jnp.float32)
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == "epsilon":
    return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
  if prediction_type == "v_prediction":
    return clipped / (snr + 1.0)
  if prediction_type == "sample":
    return clipped
  raise ValueError(f"prediction_type must be one of {schedules.PREDICTION_TYPES}, "
                   f"got {prediction_type!r}")


def diffusion_loss(schedule: Schedule, model_output, x0, noise, t, *,
                   prediction_type: str = "epsilon", snr_gamma: float | None = None,
                   weights=None):
  """Per-example weighted mean squared error between the denoiser output and its target.

  Args:
    schedule: the schedule.
    model_output: denoiser output for x_t [B, ...] (any float dtype; the loss is float32).
    x0: clean latents [B, ...].
    noise: the noise that made x_t.
    t: int timesteps [B].
    prediction_type: what the denoiser predicts (static).
    snr_gamma: None or 0 for the plain loss, else the min-SNR-gamma clamp (static).
    weights: optional per-example weights [B] (e.g. rewards, or 0 for padding examples).

  Returns:
    float32 losses [B]: mean over each example's elements, times the min-SNR weight and the
    per-example weight.
  """
  target = training_target(schedule, x0.astype(jnp.float32), noise.astype(jnp.float32), t,
                           prediction_type)
  err = jnp.square(model_output.astype(jnp.float32) - target)
  loss = err.reshape(err.shape[0], -1).mean(axis=-1)
  if snr_gamma:
    loss = loss * min_snr_weights(schedule, t, snr_gamma, prediction_type)
  if weights is not None:
    loss = loss * jnp.asarray(weights, jnp.float32)
  return loss
