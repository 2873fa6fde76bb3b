"""Inference timesteps and the jittable sampling loop of any registered sampler, with CFG.

This module owns (1) `make_timesteps`, which mirrors each diffusers scheduler's
`set_timesteps` (and its notion of the previous timestep) on the host, and (2) `sample_loop`,
one pure function that runs the whole reverse process as a `lax.scan` over those timesteps
with classifier-free guidance, returning the final latents or, for DDPO, the full trajectory
with exact per-step log-probs. Both look the sampler up by name in
`fundax.diffusion.registry` (built in: DDPM, DDIM, DPM-Solver++(2M)); neither names one.

Static vs traced: the sampler, the number of steps and the timestep spacing shape the
computation and are static; guidance_scale and eta are traced, so changing them between calls
does not recompile. There are no host callbacks: the loop works under a user's jit and vmap.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fundax.diffusion import registry
from fundax.diffusion import schedules


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
    sampler: a registered sampler's name (`registry.sampler_names()`).
    num_steps: number of inference steps T.
    num_train_timesteps: N of the schedule.
    timestep_spacing: "leading", "trailing" or "linspace"; None takes the sampler's diffusers
      default (`Sampler.default_spacing`: "leading" for DDPM/DDIM, "linspace" for DPM-Solver).
    steps_offset: added to "leading" timesteps (1 in the Stable Diffusion configs).

  Returns:
    (timesteps [T], prev_timesteps [T]) int32 numpy arrays, descending. prev_timesteps is what
    the scheduler steps to: the next timestep (-1 after the last) for DDPM and DPM-Solver,
    t - N // T for DDIM (negative past the end).
  """
  chosen = registry.get_sampler(sampler)
  if not 0 < num_steps <= num_train_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
  spacing = timestep_spacing or chosen.default_spacing
  if spacing not in schedules.TIMESTEP_SPACINGS:
    raise ValueError(f"timestep_spacing must be one of {schedules.TIMESTEP_SPACINGS}, got "
                     f"{spacing!r}")
  ts, prev = chosen.timesteps(num_steps, num_train_timesteps, spacing, steps_offset)
  return np.asarray(ts).astype(np.int32), np.asarray(prev).astype(np.int32)


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
    sampler: a registered sampler's name (static).
    num_steps: number of inference steps T (static).
    guidance_scale: CFG weight (traced scalar).
    eta: DDIM stochasticity (traced scalar); samplers without one ignore it.
    prediction_type: what denoise_fn predicts: "epsilon", "v_prediction" or "sample" (static).
    return_trajectory: also return the `Trajectory` (static).
    timestep_spacing: see `make_timesteps` (static).
    steps_offset: see `make_timesteps` (static).

  Returns:
    The final latents [B, ...] shaped like x_T, or (final latents, Trajectory) when
    return_trajectory.
  """
  chosen = registry.get_sampler(sampler)
  ts, prev_ts = make_timesteps(sampler, num_steps, schedule.num_train_timesteps,
                               timestep_spacing=timestep_spacing, steps_offset=steps_offset)
  xs = (np.arange(num_steps, dtype=np.int32), ts, prev_ts)

  def body(carry, step_xs):
    x, history = carry
    i, t, t_prev = step_xs
    model_output = guided_model_output(denoise_fn, x, t, cond, uncond, guidance_scale)
    x_next, log_prob, history = chosen.step(
        schedule, model_output, t, t_prev, x, history, key=jax.random.fold_in(key, i), eta=eta,
        prediction_type=prediction_type)
    return (x_next, history), ((x_next, log_prob) if return_trajectory else None)

  (x_0, _), ys = jax.lax.scan(body, (x_T, chosen.init_carry(x_T)), xs)
  if not return_trajectory:
    return x_0
  latents, log_probs = ys
  trajectory = Trajectory(
      latents=jnp.concatenate([x_T[None], latents], axis=0), log_probs=log_probs,
      timesteps=jnp.asarray(ts), prev_timesteps=jnp.asarray(prev_ts))
  return x_0, trajectory
