"""Rollouts: K candidates per prompt with their whole trajectory and exact per-step log-probs.

This module owns the sampling side of the policy: `rollout` is `fundax.sampling.generate` with
the trajectory kept (`sampling.conditioning` and `sampling.sample_conditioned` with
`return_trajectory`, in one jit), for any registered sampler with exact log-probs
(`fundax.diffusion.registry`; `rollout.sampler` of configs/rlhf.py, DDIM by default, with
stochasticity eta > 0). It keeps what the DDPO update needs to score the same steps again: the
latents before and after every step, each step's log-prob, the timesteps and the conditioning.
A rollout's images equal `generate`'s for the same key, sampler, guidance and eta.

`guided_output` is classifier-free guidance with a timestep per example (the update scores a
different step of each trajectory in one UNet call); with equal timesteps it is the same
computation as the sampler's, which is what makes the update's first importance ratio 1.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fundax import sampling
from fundax.diffusion import registry
from fundax.diffusion import samplers
from fundax.models import ldm as ldm_lib


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


def rollout(unet_params, frozen, input_ids, attention_mask, key, guidance_scale, eta,
            mirror=None, *, models: ldm_lib.Models, sampler: str, num_steps: int) -> Rollout:
  """Samples trajectories with a sampler that scores its own steps.

  Args:
    unet_params: the policy's UNet params.
    frozen: {"vae": ..., "text": ...} frozen params.
    input_ids: int [B, L] tokenised prompts (each prompt repeated K times).
    attention_mask: int [B, L].
    key: PRNG key; the initial noise and every step's noise derive from it as in `generate`.
    guidance_scale: classifier-free guidance weight (traced).
    eta: DDIM stochasticity (traced); the log-probs are 0 where a step is deterministic.
    mirror: optional bool [B]: images to flip after decoding (a model with a canonical eye;
      see `sampling.eye_mirror`). The trajectory stays in the canonical orientation.
    models: the static models.
    sampler: a registered sampler with exact log-probs (static).
    num_steps: its steps T (static).

  Returns:
    The `Rollout`.
  """
  registry.get_sampler(sampler, need_log_probs=True)
  cond, uncond = sampling.conditioning(models, frozen["text"], input_ids, attention_mask)
  images, _, trajectory = sampling.sample_conditioned(
      {"unet": unet_params, "vae": frozen["vae"]}, models, cond, uncond, key, sampler=sampler,
      num_steps=num_steps, guidance_scale=guidance_scale, eta=eta, mirror=mirror,
      return_trajectory=True)
  return Rollout(trajectory.latents, trajectory.log_probs, trajectory.timesteps,
                 trajectory.prev_timesteps, images, cond, uncond)


def stochastic_steps(models: ldm_lib.Models, sampler: str, num_steps: int) -> np.ndarray:
  """Indices of the sampler's steps that have a density (std > 0 at eta 1), on the host.

  A step that lands deterministically (the last DDPM step; the last DDIM step when it steps to
  alpha-bar 1, `set_alpha_to_one`) has log-prob 0 and carries no policy gradient, so the
  update never samples it.
  """
  chosen = registry.get_sampler(sampler, need_log_probs=True)
  ts, prev = samplers.make_timesteps(sampler, num_steps, models.schedule.num_train_timesteps,
                                     **models.timestep_options)
  with jax.ensure_compile_time_eval():
    zeros = jnp.zeros((num_steps, 1), jnp.float32)
    _, std = chosen.moments(models.schedule, zeros, jnp.asarray(ts), jnp.asarray(prev), zeros,
                            1.0, models.prediction_type)
  std = np.broadcast_to(np.asarray(std), (num_steps, 1))[:, 0]
  keep = np.flatnonzero(std > 0).astype(np.int32)
  if not len(keep):
    raise ValueError(f"{sampler} with {num_steps} steps has no stochastic step to train on")
  return keep


def guided_output(models: ldm_lib.Models, unet_params, x, t, cond, uncond, guidance_scale):
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
  out = ldm_lib.denoise(models, unet_params, jnp.concatenate([x, x], axis=0),
                        jnp.concatenate([t, t], axis=0).astype(jnp.int32), both)
  out_u, out_c = out[:b], out[b:]
  return out_u + jnp.asarray(guidance_scale, out.dtype) * (out_c - out_u)


def step_moments(models: ldm_lib.Models, unet_params, x_t, t, t_prev, cond, uncond,
                 guidance_scale, eta, *, sampler: str):
  """Mean and std of the policy's step from x_t (per-example t, t_prev [B]) under `sampler`."""
  out = guided_output(models, unet_params, x_t, t, cond, uncond, guidance_scale)
  return registry.get_sampler(sampler, need_log_probs=True).moments(
      models.schedule, out, t, t_prev, x_t, eta, models.prediction_type)
