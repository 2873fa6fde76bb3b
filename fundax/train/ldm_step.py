"""The latent diffusion train and eval steps: pure functions of (state, batch, rng, frozen).

This module owns one optimisation step of the text-conditioned UNet:

  1. latents: the batch's cached "latents", else the frozen VAE encodes "image" and samples
     its posterior (times the VAE's scaling factor);
  2. text: the batch's cached "text_embeddings", else the frozen text encoder encodes
     "input_ids"; with probability `caption_dropout` an example's prompt is replaced by the
     empty prompt, which teaches the unconditional model that classifier-free guidance needs;
  3. noise at uniform random timesteps, the UNet's prediction, the per-example loss of
     `fundax.diffusion.losses` (epsilon or v targets, optional min-SNR-gamma and per-example
     "weights"), gradients, the optimizer (clipping and LR schedule live in it) and the EMA;
     an update with a NaN/inf loss or gradient is skipped (`fundax.train.guard`).

The step is written for one device; `parallel.jit_step` shards it. Randomness is
`fold_in(rng, state.step)` split by purpose, so a resumed run replays the same draws. Compute
precision is the modules' `dtype` (bfloat16 for mixed precision); the loss is float32.

Step config fields (`config.train` of configs/ldm.py; read at trace time, so static):
  caption_dropout  probability of replacing a prompt by the empty prompt.
  snr_gamma        min-SNR-gamma clamp; 0 disables the weighting.
  ema_decay        EMA decay per step (used only when the state tracks an EMA).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fundax.diffusion import losses
from fundax.diffusion import schedules
from fundax.models import ldm as ldm_lib
from fundax.models import vae as vae_lib
from fundax.train import guard
from fundax.train import state as state_lib


def encode_latents(models: ldm_lib.Models, vae_params, images, rng):
  """Images [B, H, W, 3] in [-1, 1] -> scaled diffusion latents (a posterior sample)."""
  posterior = models.vae.apply({"params": vae_params}, images, method="encode")
  z = posterior.sample(rng).astype(jnp.float32)
  return vae_lib.to_latents(z, models.vae.config)


def conditioning(models: ldm_lib.Models, text_params, batch):
  """(token states [B, L, D], attention mask [B, L] int32) from cached embeddings or ids."""
  if "text_embeddings" in batch:
    states = batch["text_embeddings"]
    mask = batch.get("attention_mask")
    if mask is None:
      mask = jnp.ones(states.shape[:2], jnp.int32)
    return states, mask
  states = ldm_lib.encode_text(models, text_params, batch["input_ids"], batch["attention_mask"])
  return states, batch["attention_mask"]


def drop_captions(models: ldm_lib.Models, text_params, states, mask, probability: float, rng,
                  empty=None):
  """Replaces each example's prompt by the empty prompt with the given probability.

  Args:
    models: the models (for the empty-prompt embedding).
    text_params: frozen text encoder params (unused when `empty` is given).
    states: token states [B, L, D].
    mask: attention mask [B, L].
    probability: drop probability in [0, 1] (static).
    rng: key for the per-example coin flips.
    empty: the empty prompt's (states [1, L, D], mask [1, L]), computed once by the caller;
      None encodes it here (one text-encoder pass per step).

  Returns:
    (states, mask, dropped [B] bool).
  """
  batch, length = mask.shape
  dropped = jax.random.bernoulli(rng, probability, (batch,))
  if probability <= 0:
    return states, mask, dropped
  empty_states, empty_mask = (ldm_lib.empty_text(models, text_params, length) if empty is None
                             else empty)
  states = jnp.where(dropped[:, None, None], empty_states.astype(states.dtype), states)
  mask = jnp.where(dropped[:, None], empty_mask.astype(mask.dtype), mask)
  return states, mask, dropped


def _noised_inputs(models: ldm_lib.Models, frozen, batch, rng, caption_dropout: float):
  """Everything the loss needs that does not depend on the trained params."""
  rng_latent, rng_drop, rng_t, rng_noise = jax.random.split(rng, 4)
  if "latents" in batch:
    latents = batch["latents"].astype(jnp.float32)
  else:
    latents = encode_latents(models, frozen["vae"], batch["image"], rng_latent)
  states, mask = conditioning(models, frozen.get("text"), batch)
  states, mask, dropped = drop_captions(models, frozen.get("text"), states, mask,
                                        caption_dropout, rng_drop, frozen.get("empty_text"))
  b = latents.shape[0]
  t = jax.random.randint(rng_t, (b,), 0, models.schedule.num_train_timesteps)
  noise = jax.random.normal(rng_noise, latents.shape, jnp.float32)
  x_t = schedules.add_noise(models.schedule, latents, noise, t)
  inputs = dict(latents=latents, noise=noise, t=t, x_t=x_t, states=jax.lax.stop_gradient(states),
                mask=mask)
  return inputs, dropped


def _per_example_loss(unet_params, models: ldm_lib.Models, inputs, weights, snr_gamma: float):
  out = ldm_lib.denoise(models, unet_params, inputs["x_t"], inputs["t"],
                        (inputs["states"], inputs["mask"]))
  return losses.diffusion_loss(models.schedule, out, inputs["latents"], inputs["noise"],
                               inputs["t"], prediction_type=models.prediction_type,
                               snr_gamma=snr_gamma or None, weights=weights)


def ldm_train_step(state: state_lib.TrainState, batch: dict[str, Any], rng: jax.Array,
                   frozen: dict[str, Any], *, models: ldm_lib.Models,
                   tx: optax.GradientTransformation, config: Any):
  """One optimisation step of the UNet.

  Args:
    state: TrainState whose params are the UNet's.
    batch: "image" [B, H, W, 3] or "latents" [B, h, w, c]; "input_ids" + "attention_mask"
      [B, L] or "text_embeddings" [B, L, D] (+ optional "attention_mask"); optional "weights"
      [B] per-example loss weights.
    rng: the run's train key (the step folds in `state.step`).
    frozen: {"vae": VAE params, "text": text encoder params}; with cached "latents" and
      "text_embeddings" in the batch, {"empty_text": (states [1, L, D], mask [1, L])} (the
      empty prompt, encoded once) is enough.
    models: the static models.
    tx: the optimizer the state was created with.
    config: step config (caption_dropout, snr_gamma, ema_decay); see the module docstring.

  Returns:
    (new state, metrics): loss (weighted mean), nonfinite (1 when the loss or gradients were
    NaN/inf and the update was skipped: see `fundax.train.guard`), grad_norm,
    caption_dropped (fraction), t_mean.
  """
  rng = jax.random.fold_in(rng, state.step)
  inputs, dropped = _noised_inputs(models, frozen, batch, rng, float(config.caption_dropout))
  weights = batch.get("weights")

  def loss_fn(params):
    per_example = _per_example_loss(params, models, inputs, weights, float(config.snr_gamma))
    return per_example.mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  new_state = state_lib.apply_gradients(
      state, grads, tx, ema_decay=config.ema_decay if state.ema_params is not None else None)
  new_state, nonfinite = guard.keep_finite(state, new_state, guard.all_finite(loss, grads))
  metrics = {
      "loss": loss,
      "nonfinite": nonfinite,
      "grad_norm": optax.global_norm(grads),
      "caption_dropped": dropped.astype(jnp.float32).mean(),
      "t_mean": inputs["t"].astype(jnp.float32).mean(),
  }
  return new_state, metrics


def ldm_eval_step(params, batch: dict[str, Any], rng: jax.Array, frozen: dict[str, Any], *,
                  models: ldm_lib.Models, config: Any):
  """The validation loss: no caption dropout, the same draws for every call with this rng.

  Args:
    params: UNet params (e.g. the EMA).
    batch: as for `ldm_train_step`; an optional "valid" [B] bool masks out padding examples.
    rng: evaluation key (fixed across evaluations, so losses are comparable over training).
    frozen: {"vae": ..., "text": ...}.
    models: the static models.
    config: step config (snr_gamma is applied as in training).

  Returns:
    {"loss": mean over valid examples, "count": number of valid examples}.
  """
  inputs, _ = _noised_inputs(models, frozen, batch, rng, 0.0)
  per_example = _per_example_loss(params, models, inputs, None, float(config.snr_gamma))
  valid = batch.get("valid")
  valid = jnp.ones_like(per_example) if valid is None else valid.astype(jnp.float32)
  count = valid.sum()
  return {"loss": (per_example * valid).sum() / jnp.maximum(count, 1.0), "count": count}
