"""Rollouts: K candidates per prompt with their whole trajectory and exact per-step log-probs.

This module owns the sampling side of the policy: `rollout` runs text encoding, the DDIM
reverse process with stochasticity eta > 0 as one `lax.scan` (`fundax.diffusion.sample_loop`
with `return_trajectory`) and VAE decoding, all in one jit, and keeps what the DDPO update
needs to score the same steps again: the latents before and after every step, each step's
log-prob, the timesteps and the conditioning. Key handling matches `fundax.sampling.generate`,
so a rollout's images equal `generate`'s for the same key, guidance and eta.

`guided_output` is classifier-free guidance with a timestep per example (the update scores a
different step of each trajectory in one UNet call); with equal timesteps it is the same
computation as the sampler's, which is what makes the update's first importance ratio 1.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fundax import sampling
from fundax.diffusion import samplers
from fundax.diffusion import steps


class Rollout(NamedTuple):
  """A batch of sampled trajectories (arrays; batch axis B = prompts x candidates).

  Attributes:
    latents: [T + 1, B, h, w, c]: x_T, then the sample after each step.
    log_probs: [T, B] float32 log p(latents[i + 1] | latents[i]) under the sampling policy.
    timesteps: [T] int32 t of step i.
    prev_timesteps: [T] int32 t_prev of step i.
    images: [B, H, W, 3] decoded final samples, float32 in [-1, 1].
    cond: (token states [B, L, D], attention mask [B, L]) of the prompts.
    uncond: the empty prompt's (states, mask), broadcast to [B, ...].
  """
  latents: Any
  log_probs: Any
  timesteps: Any
  prev_timesteps: Any
  images: Any
  cond: Any
  uncond: Any


def conditioning(models: sampling.Models, text_params, input_ids, attention_mask):
  """(cond, uncond) token states and masks for classifier-free guidance, batch-first."""
  states = sampling.encode_text(models, text_params, input_ids, attention_mask)
  empty_states, empty_mask = sampling.empty_text(models, text_params, input_ids.shape[1])
  uncond = (jnp.broadcast_to(empty_states, states.shape).astype(states.dtype),
            jnp.broadcast_to(empty_mask, attention_mask.shape).astype(attention_mask.dtype))
  return (states, attention_mask), uncond


def rollout(unet_params, frozen, input_ids, attention_mask, key, guidance_scale, eta,
            mirror=None, *, models: sampling.Models, num_steps: int) -> Rollout:
  """Samples trajectories with DDIM (eta > 0 makes every step but the last stochastic).

  Args:
    unet_params: the policy's UNet params.
    frozen: {"vae": ..., "text": ...} frozen params.
    input_ids: int [B, L] tokenised prompts (each prompt repeated K times).
    attention_mask: int [B, L].
    key: PRNG key; the initial noise and every step's noise derive from it as in `generate`.
    guidance_scale: classifier-free guidance weight (traced).
    eta: DDIM stochasticity (traced); the log-probs are 0 where it makes a step deterministic.
    mirror: optional bool [B]: images to flip after decoding (a model with a canonical eye;
      see `sampling.eye_mirror`). The trajectory stays in the canonical orientation.
    models: the static models.
    num_steps: DDIM steps T (static).

  Returns:
    The `Rollout`.
  """
  rng_noise, rng_sampler = jax.random.split(key)
  cond, uncond = conditioning(models, frozen["text"], input_ids, attention_mask)
  x_T = jax.random.normal(rng_noise, (input_ids.shape[0],) + models.latent_shape, jnp.float32)
  x_0, trajectory = samplers.sample_loop(
      functools.partial(sampling.denoise, models, unet_params), models.schedule, x_T, cond,
      uncond, rng_sampler, sampler="ddim", num_steps=num_steps, guidance_scale=guidance_scale,
      eta=eta, prediction_type=models.prediction_type, return_trajectory=True,
      **models.timestep_options)
  images = sampling.decode_latents(models, frozen["vae"], x_0)
  if mirror is not None:
    images = sampling.mirror_images(images, mirror)
  return Rollout(trajectory.latents, trajectory.log_probs, trajectory.timesteps,
                 trajectory.prev_timesteps, images, cond, uncond)


def stochastic_steps(models: sampling.Models, num_steps: int) -> np.ndarray:
  """Indices of the DDIM steps that have a density (std > 0 for eta > 0), on the host.

  The last step is deterministic when it steps to alpha-bar 1 (`set_alpha_to_one`); its
  log-prob is 0 and it carries no policy gradient, so the update never samples it.
  """
  _, prev = samplers.make_timesteps("ddim", num_steps, models.schedule.num_train_timesteps,
                                    **models.timestep_options)
  final = float(models.schedule.final_alpha_cumprod)
  keep = [i for i, p in enumerate(prev) if p >= 0 or final < 1.0]
  if not keep:
    raise ValueError(f"DDIM with {num_steps} steps has no stochastic step to train on")
  return np.asarray(keep, np.int32)


def guided_output(models: sampling.Models, unet_params, x, t, cond, uncond, guidance_scale):
  """Classifier-free guided model output with one timestep per example.

  Args:
    models: the models.
    unet_params: UNet params.
    x: latents [B, h, w, c].
    t: int timesteps [B].
    cond: (states, mask) [B, ...]; uncond: the same for the empty prompt.
    guidance_scale: traced weight w.

  Returns:
    out_u + w (out_c - out_u), float32 [B, h, w, c].
  """
  b = x.shape[0]
  both = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
  out = sampling.denoise(models, unet_params, jnp.concatenate([x, x], axis=0),
                         jnp.concatenate([t, t], axis=0).astype(jnp.int32), both)
  out_u, out_c = out[:b], out[b:]
  return out_u + jnp.asarray(guidance_scale, out.dtype) * (out_c - out_u)


def step_moments(models: sampling.Models, unet_params, x_t, t, t_prev, cond, uncond,
                 guidance_scale, eta):
  """Mean and std of the policy's DDIM step from x_t (per-example t, t_prev [B])."""
  out = guided_output(models, unet_params, x_t, t, cond, uncond, guidance_scale)
  mean, std, _ = steps.ddim_moments(models.schedule, out, t, t_prev, x_t, eta,
                                    models.prediction_type)
  return mean, std
