"""The VAE train and eval steps: reconstruction + KL, optional SSIM and PatchGAN terms.

This module owns the autoencoder's objective and its pure step functions:

  loss = rec + kl_weight * kl + ssim_weight * (1 - SSIM) + adv_weight * gate * (-D(x_rec))

with `rec` the per-pixel L1 or L2 error and `kl` the posterior's KL to N(0, I) divided by the
number of image elements (so kl_weight means what it means in the LDM paper's configs, where
both terms are summed: 1e-6 is typical). The adversarial term is on when the step config has
`adv_weight > 0` and the state's params hold a "disc" subtree; `gate` switches it (and the
discriminator's hinge loss) on at step `disc_start`, a traced comparison, so nothing
recompiles when it flips.

One backward pass updates both networks: the generator terms see the discriminator through
`stop_gradient`, the discriminator's hinge loss sees the reconstruction through
`stop_gradient`, so the gradient of their sum splits exactly into the two players' gradients,
and one optimizer steps the `{"vae", "disc"}` params tree.

Step config fields (`config.train` of configs/vae.py): recon ("l1" | "l2"), kl_weight,
ssim_weight, adv_weight, disc_start, ema_decay.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fundax.models import vae as vae_lib
from fundax.train import guard
from fundax.train import state as state_lib


def _gaussian_band(length: int, window: int, sigma: float) -> np.ndarray:
  """[length - window + 1, length]: row i holds the normalised Gaussian taps at i..i+window-1."""
  x = np.arange(window, dtype=np.float64) - (window - 1) / 2
  taps = np.exp(-0.5 * (x / sigma) ** 2)
  taps /= taps.sum()
  band = np.zeros((length - window + 1, length), np.float32)
  for i in range(len(band)):
    band[i, i:i + window] = taps
  return band


def ssim(a, b, *, window: int = 11, sigma: float = 1.5):
  """Per-example structural similarity (Wang et al. 2004) of images in [-1, 1].

  The Gaussian window is separable, applied as two banded matrix products (one per axis)
  over the valid positions: on XLA:CPU a depthwise 11x11 convolution cost about a third of
  a 64 px VAE step.

  Args:
    a, b: [B, H, W, C] images in [-1, 1] (H, W >= window).
    window: Gaussian window size; sigma: its standard deviation.

  Returns:
    float32 [B]: SSIM over the valid window positions and channels, on the [0, 1] scale.
  """
  a = (a.astype(jnp.float32) + 1) / 2
  b = (b.astype(jnp.float32) + 1) / 2
  rows = jnp.asarray(_gaussian_band(a.shape[1], window, sigma))
  cols = jnp.asarray(_gaussian_band(a.shape[2], window, sigma))

  def blur(x):
    return jnp.einsum("ih,bhwc,jw->bijc", rows, x, cols)

  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mu_a, mu_b = blur(a), blur(b)
  var_a = blur(a * a) - mu_a ** 2
  var_b = blur(b * b) - mu_b ** 2
  cov = blur(a * b) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) *
                                                    (var_a + var_b + c2))
  return s.mean(axis=(1, 2, 3))


def reconstruction_error(x, x_rec, kind: str = "l1"):
  """Per-example mean |x - x_rec| ("l1") or (x - x_rec)^2 ("l2"): float32 [B]."""
  diff = x_rec.astype(jnp.float32) - x.astype(jnp.float32)
  if kind == "l1":
    err = jnp.abs(diff)
  elif kind == "l2":
    err = jnp.square(diff)
  else:
    raise ValueError(f"recon must be 'l1' or 'l2', got {kind!r}")
  return err.reshape(err.shape[0], -1).mean(axis=-1)


def hinge_discriminator_loss(logits_real, logits_fake):
  """Per-example hinge loss of the discriminator: relu(1 - D(x)) + relu(1 + D(x_rec))."""
  real = jax.nn.relu(1.0 - logits_real).reshape(logits_real.shape[0], -1).mean(axis=-1)
  fake = jax.nn.relu(1.0 + logits_fake).reshape(logits_fake.shape[0], -1).mean(axis=-1)
  return real + fake


def _reconstruct(vae: vae_lib.AutoencoderKL, vae_params, images, rng):
  posterior = vae.apply({"params": vae_params}, images, method="encode")
  z = posterior.sample(rng) if rng is not None else posterior.mode()
  x_rec = vae.apply({"params": vae_params}, z, method="decode")
  elements = images.shape[1] * images.shape[2] * images.shape[3]
  return x_rec, posterior.kl() / elements


def vae_train_step(state: state_lib.TrainState, batch: dict[str, Any], rng: jax.Array, *,
                   vae: vae_lib.AutoencoderKL, discriminator: nn.Module | None,
                   tx: optax.GradientTransformation, config: Any):
  """One optimisation step of the autoencoder (and its discriminator, when enabled).

  Args:
    state: TrainState with params {"vae": ...} or {"vae": ..., "disc": ...}.
    batch: "image" [B, H, W, 3] in [-1, 1].
    rng: the run's train key (the step folds in `state.step`).
    vae: the autoencoder module.
    discriminator: the PatchGAN module, or None for no adversarial term.
    tx: the optimizer the state was created with.
    config: step config (see the module docstring).

  Returns:
    (new state, metrics): loss, rec, kl, ssim, and with a discriminator g_adv, d_loss,
    logits_real, logits_fake, adv_active; plus grad_norm and nonfinite (1 when the objective
    or gradients were NaN/inf and the update was skipped: `fundax.train.guard`).
  """
  rng_z = jax.random.fold_in(rng, state.step)
  images = batch["image"]
  adversarial = discriminator is not None and float(config.adv_weight) > 0
  gate = (state.step >= int(config.disc_start)).astype(jnp.float32)

  def loss_fn(params):
    x_rec, kl = _reconstruct(vae, params["vae"], images, rng_z)
    rec = reconstruction_error(images, x_rec, config.recon)
    similarity = ssim(images, x_rec)
    total = rec + float(config.kl_weight) * kl
    if float(config.ssim_weight) > 0:
      total = total + float(config.ssim_weight) * (1.0 - similarity)
    metrics = {"rec": rec.mean(), "kl": kl.mean(), "ssim": similarity.mean()}
    if adversarial:
      disc = lambda p, x: discriminator.apply({"params": p}, x)
      frozen_disc = jax.lax.stop_gradient(params["disc"])
      g_adv = -disc(frozen_disc, x_rec).reshape(x_rec.shape[0], -1).mean(axis=-1)
      total = total + float(config.adv_weight) * gate * g_adv
      logits_real = disc(params["disc"], images)
      logits_fake = disc(params["disc"], jax.lax.stop_gradient(x_rec))
      d_loss = hinge_discriminator_loss(logits_real, logits_fake)
      metrics.update(g_adv=g_adv.mean(), d_loss=d_loss.mean(), logits_real=logits_real.mean(),
                     logits_fake=logits_fake.mean(), adv_active=gate)
      objective = total.mean() + gate * d_loss.mean()
    else:
      objective = total.mean()
    metrics["loss"] = total.mean()
    return objective, metrics

  (objective, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state_lib.apply_gradients(
      state, grads, tx, ema_decay=config.ema_decay if state.ema_params is not None else None)
  new_state, metrics["nonfinite"] = guard.keep_finite(
      state, new_state, guard.all_finite(objective, grads))
  metrics["grad_norm"] = optax.global_norm(grads)
  return new_state, metrics


def vae_eval_step(params, batch: dict[str, Any], *, vae: vae_lib.AutoencoderKL):
  """Reconstruction quality through the posterior mean (deterministic).

  Args:
    params: {"vae": ...} (a "disc" subtree is ignored), e.g. the EMA params.
    batch: "image" [B, H, W, 3]; optional "valid" [B] bool masks out padding examples.
    vae: the autoencoder module.

  Returns:
    Means over valid examples of l1, mse, psnr (dB, on the [0, 1] scale), ssim and kl; and
    count.
  """
  images = batch["image"]
  x_rec, kl = _reconstruct(vae, params["vae"], images, None)
  x_rec = jnp.clip(x_rec.astype(jnp.float32), -1.0, 1.0)
  mse = reconstruction_error(images, x_rec, "l2")
  per_example = {
      "l1": reconstruction_error(images, x_rec, "l1"),
      "mse": mse,
      # [-1, 1] errors are twice [0, 1] ones: mse01 = mse / 4.
      "psnr": 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)),
      "ssim": ssim(images, x_rec),
      "kl": kl,
  }
  valid = batch.get("valid")
  valid = jnp.ones_like(mse) if valid is None else valid.astype(jnp.float32)
  count = valid.sum()
  out = {k: (v * valid).sum() / jnp.maximum(count, 1.0) for k, v in per_example.items()}
  out["count"] = count
  return out
