"""Stage 2: active selection, then reward-weighted denoising on the accepted candidates.

A fresh batch of candidates is scored by the Selector; those at or above its learned threshold
are accepted. The update (`rwr_update_step`) minimises

    sum_i w_i L_i / n_acc  +  pretrain_weight * mean_j L_j  +  negative_weight * N

where L is the denoising loss of `fundax.diffusion.losses` (random timestep and noise per
example) of a candidate's own final latents under its prompt, the reward weights w
(`reward_weights`) are zero for rejected candidates and average 1 over the accepted ones,
the second term is the pre-training loss on phantom (real-data stand-in) images and their
captions, which keeps the model anchored to the data distribution, and N is an optional
KTO-style negative signal for rejected candidates:

    N = mean_rejected -log sigmoid(beta * (L_theta - L_ref)),

which asks the policy to fit a rejected sample *worse* than the frozen reference does, through
a saturating (bounded) loss rather than a negated MSE that would diverge.

An update whose loss or gradients are NaN/inf is skipped (`fundax.train.guard`): the params and
optimizer state stay as they were and the metric `nonfinite` is 1 (the RLHF loop counts them).

Step config fields (`config.stage2`, static): pretrain_weight, negative_weight, negative_beta,
snr_gamma.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fundax.diffusion import losses
from fundax.diffusion import schedules
from fundax.models import ldm as ldm_lib
from fundax.train import guard
from fundax.train import ldm_step
from fundax.train import state as state_lib

# The stage-2 config fields the update reads at trace time (the module docstring).
STEP_FIELDS = ("pretrain_weight", "negative_weight", "negative_beta", "snr_gamma")


def reward_weights(rewards, accepted, temperature: float) -> np.ndarray:
  """Reward-weighted regression weights: exp(r / temperature) on accepted candidates, mean 1.

  Args:
    rewards: [N] Selector scores.
    accepted: [N] bool, score >= threshold.
    temperature: > 0; large values weight accepted candidates equally.

  Returns:
    float32 [N]: 0 for rejected candidates; over the accepted ones, proportional to
    exp((r - max r) / temperature) and averaging 1 (all zeros when none is accepted).
  """
  if temperature <= 0:
    raise ValueError(f"stage2.temperature must be > 0, got {temperature}")
  rewards = np.asarray(rewards, np.float64)
  accepted = np.asarray(accepted, bool)
  weights = np.zeros_like(rewards)
  if accepted.any():
    w = np.exp((rewards[accepted] - rewards[accepted].max()) / temperature)
    weights[accepted] = w * accepted.sum() / w.sum()
  return weights.astype(np.float32)


def _noised(models: ldm_lib.Models, x0, rng):
  rng_t, rng_noise = jax.random.split(rng)
  t = jax.random.randint(rng_t, (x0.shape[0],), 0, models.schedule.num_train_timesteps)
  noise = jax.random.normal(rng_noise, x0.shape, jnp.float32)
  return noise, t, schedules.add_noise(models.schedule, x0, noise, t)


def _denoising_loss(models, unet_params, x0, noise, t, x_t, cond, snr_gamma):
  out = ldm_lib.denoise(models, unet_params, x_t, t, cond)
  return losses.diffusion_loss(models.schedule, out, x0, noise, t,
                               prediction_type=models.prediction_type,
                               snr_gamma=snr_gamma or None)


def rwr_update_step(state: state_lib.TrainState, batch: dict[str, Any], rng: jax.Array,
                    frozen: dict[str, Any], *, models: ldm_lib.Models,
                    tx: optax.GradientTransformation, config: Any):
  """One stage-2 optimizer update (pure; jit it once).

  Args:
    state: TrainState of the UNet params.
    batch: "latents" [B, h, w, c] candidates' final latents, "cond" their (states, mask),
      "weights" [B] (`reward_weights`), "rejected" [B] float 0/1, "pretrain_image"
      [P, H, W, 3] phantom images and "pretrain_cond" their captions' (states, mask).
    rng: the run's stage-2 key (the step folds in `state.step`).
    frozen: {"vae": ..., "reference": reference UNet params}.
    models: the static models.
    tx: the optimizer.
    config: stage-2 config (see the module docstring).

  Returns:
    (new state, metrics): loss, rwr_loss, pretrain_loss, negative_loss, grad_norm, and
    nonfinite (1 when a NaN/inf loss or gradient left the state unchanged).
  """
  rng = jax.random.fold_in(rng, state.step)
  rng_noise, rng_latent = jax.random.split(rng)
  snr_gamma = float(config.snr_gamma)
  b = batch["latents"].shape[0]
  pre_x0 = ldm_step.encode_latents(models, frozen["vae"], batch["pretrain_image"], rng_latent)
  # Candidates and phantom examples share one UNet call (one forward and backward).
  x0 = jnp.concatenate([batch["latents"].astype(jnp.float32), pre_x0], axis=0)
  cond = jax.tree.map(lambda a, p: jnp.concatenate([a, p.astype(a.dtype)], axis=0),
                      batch["cond"], batch["pretrain_cond"])
  noise, t, x_t = _noised(models, x0, rng_noise)
  weights, rejected = batch["weights"], batch["rejected"]
  negative_weight = float(config.negative_weight)
  if negative_weight > 0:
    ref_loss = jax.lax.stop_gradient(_denoising_loss(
        models, frozen["reference"], x0[:b], noise[:b], t[:b], x_t[:b],
        jax.tree.map(lambda a: a[:b], cond), snr_gamma))

  def loss_fn(params):
    both = _denoising_loss(models, params, x0, noise, t, x_t, cond, snr_gamma)
    per_example = both[:b]
    n_acc = jnp.maximum((weights > 0).sum(), 1)
    rwr = (weights * per_example).sum() / n_acc
    pre = both[b:].mean()
    if negative_weight > 0:
      margin = float(config.negative_beta) * (per_example - ref_loss)
      neg = (rejected * -jax.nn.log_sigmoid(margin)).sum() / jnp.maximum(rejected.sum(), 1.0)
    else:
      neg = jnp.zeros(())
    loss = rwr + float(config.pretrain_weight) * pre + negative_weight * neg
    return loss, {"rwr_loss": rwr, "pretrain_loss": pre, "negative_loss": neg}

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics.update(loss=loss, grad_norm=optax.global_norm(grads))
  new_state = state_lib.apply_gradients(state, grads, tx)
  new_state, metrics["nonfinite"] = guard.keep_finite(state, new_state,
                                                      guard.all_finite(loss, grads))
  return new_state, metrics
