"""Stage 1: the DDPO policy-gradient update with PPO clipping and a KL penalty to the reference.

The policy is the guided sampler of the rollouts (DDIM by default; any registered
`GaussianSampler`); a trajectory's action at step i is latents[i + 1] given latents[i], with
the sampler's exact Gaussian log-prob (`fundax.diffusion.steps`). One update
(`ddpo_update_step`):

  1. draws, per trajectory, a random subset of its stochastic steps (`fold_in(rng, step)`, so a
     resumed run draws the same ones);
  2. `lax.scan`s over that subset: at scan index s every trajectory scores its own s-th chosen
     step with the current params, forms the importance ratio exp(log p_theta - log p_old),
     the PPO-clipped surrogate and the KL to the reference model, and adds the gradient to the
     scan's running sum. The batch goes through in `micro_batches` equal parts (an inner
     scan), so memory holds one UNet backward on B / micro_batches trajectories at a time;
  3. applies one optimizer update with the mean gradient (the same for any micro_batches),
     unless the loss or the gradient is NaN/inf: then the params and optimizer state stay as
     they were and the metric `nonfinite` is 1 (`fundax.train.guard`; the RLHF loop counts
     them).

The KL of one step is exact: both policies' steps are Gaussians with the same std (it depends on
the schedule only), so KL = |mean_theta - mean_ref|^2 / (2 std^2). Log-ratios and the KL are per
latent element (the exact sums divided by the element count), as in ddpo-pytorch, which takes
the mean log-prob over latent elements: a summed log-ratio grows with the latent size (a 32 x 32
x 4 latent moves by hundreds of nats in one update), so a PPO clip of 1e-4 would clip every
example and the same clip_range could not serve two resolutions. Metrics: the loss terms,
approx-KL to the rollout policy (0.5 E[(log ratio)^2]), the clip fraction
(|ratio - 1| > clip_range) and the mean ratio.

Step config fields (`config.stage1` of configs/rlhf.py; read at trace time, static):
  timestep_fraction  fraction of the stochastic steps trained on per update (at least one).
  clip_range         PPO clip epsilon (passed to the step as a traced batch scalar).
  kl_weight          weight of the KL penalty to the reference model; 0 skips its forward pass.
  micro_batches      parts the batch is split into per backward pass (>= 1, dividing the
                     per-device batch); the gradient is the same, peak memory smaller.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fundax.diffusion import steps
from fundax.models import ldm as ldm_lib
from fundax.rl import rollout as rollout_lib
from fundax.train import guard
from fundax.train import state as state_lib

# The stage-1 config fields the update reads at trace time (the module docstring): the step's
# program depends on these and on nothing else of the config.
STEP_FIELDS = ("timestep_fraction", "kl_weight", "micro_batches")


def ppo_loss(ratio, advantages, clip_range):
  """Per-example PPO-clipped surrogate loss (to minimise).

  max(-A r, -A clip(r, 1 - eps, 1 + eps)): the pessimistic bound, so a ratio already past the
  clip in the direction the advantage favours contributes no gradient, while one that moved
  the wrong way keeps its full gradient.

  Args:
    ratio: importance ratios [B].
    advantages: advantages [B].
    clip_range: epsilon (scalar, may be traced).

  Returns:
    Losses [B].
  """
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  return jnp.maximum(unclipped, clipped)


def gaussian_kl(mean_p, mean_q, std):
  """KL(N(mean_p, std^2) || N(mean_q, std^2)) summed over non-batch dims -> [B] (std > 0)."""
  safe = jnp.where(std > 0, std, 1.0)
  kl = jnp.square(mean_p - mean_q) / (2.0 * jnp.square(safe))
  kl = jnp.where(jnp.broadcast_to(std > 0, kl.shape), kl, 0.0)
  return kl.reshape(kl.shape[0], -1).sum(axis=-1)


def num_train_steps(num_stochastic: int, fraction: float) -> int:
  """How many steps of each trajectory one update trains on."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"stage1.timestep_fraction must be in (0, 1], got {fraction}")
  return max(1, int(math.ceil(num_stochastic * fraction - 1e-9)))


def choose_steps(rng, stochastic, batch: int, count: int):
  """[B, count] step indices: a random permutation of `stochastic` per trajectory, truncated."""
  keys = jax.random.split(rng, batch)
  return jax.vmap(lambda k: jax.random.permutation(k, stochastic)[:count])(keys)


def micro_batch(tree: Any, part, parts: int, axis: int = 0) -> Any:
  """Trajectories part, part + parts, part + 2 parts, ... of a batch (every leaf's `axis`).

  Interleaved, not contiguous: with the batch axis sharded over devices in contiguous blocks,
  every part keeps an equal share on every device, so no part moves between devices.
  """
  def take(x):
    shape = x.shape[:axis] + (x.shape[axis] // parts, parts) + x.shape[axis + 1:]
    return jax.lax.dynamic_index_in_dim(x.reshape(shape), part, axis + 1, keepdims=False)
  return jax.tree.map(take, tree)


def ddpo_update_step(state: state_lib.TrainState, batch: dict[str, Any], rng: jax.Array,
                     frozen: dict[str, Any], *, models: ldm_lib.Models,
                     tx: optax.GradientTransformation, config: Any, sampler: str,
                     stochastic):
  """One DDPO optimizer update from a batch of rollouts (pure; jit it once).

  Args:
    state: TrainState of the UNet params.
    batch: "latents" [T + 1, B, ...], "log_probs" [T, B], "timesteps" [T], "prev_timesteps"
      [T], "advantages" [B], "cond" and "uncond" ((states, mask) pytrees, batch-first), and the
      traced scalars "guidance_scale" and "eta" (the rollouts') and "clip_range".
    rng: the run's stage-1 key (the step folds in `state.step`).
    frozen: {"reference": reference UNet params} (read only).
    models: the static models.
    tx: the optimizer.
    config: stage-1 config (see the module docstring).
    sampler: the rollouts' registered sampler (with exact log-probs).
    stochastic: host int array of the trainable step indices (`rollout.stochastic_steps`).

  Returns:
    (new state, metrics); metrics["nonfinite"] is 1 when a NaN/inf loss or gradient left the
    state's params and optimizer state unchanged.
  """
  rng = jax.random.fold_in(rng, state.step)
  latents, old_log_probs = batch["latents"], batch["log_probs"]
  b = old_log_probs.shape[1]
  parts = int(config.micro_batches)
  if parts < 1 or b % parts:
    raise ValueError(f"stage1.micro_batches must be >= 1 and divide the batch of {b}, got "
                     f"{parts}")
  count = num_train_steps(len(stochastic), float(config.timestep_fraction))
  chosen = choose_steps(rng, jnp.asarray(stochastic), b, count)  # [B, S]
  clip_range = batch["clip_range"]
  kl_weight = float(config.kl_weight)
  per_example = jax.vmap(lambda traj, i: traj[i], in_axes=(1, 0))  # [T, B, ...], [B] -> [B, ...]
  elements = math.prod(latents.shape[2:])  # latent elements per example
  # Per-trajectory inputs, split into micro-batches inside the scans.
  trajectories = {"latents": latents, "log_probs": old_log_probs}
  examples = {"advantages": batch["advantages"], "cond": batch["cond"],
              "uncond": batch["uncond"]}

  def micro_step(carry, part, idx):
    """Adds the gradient of micro-batch `part` at chosen steps idx [B] to the carry."""
    grads_sum, metrics_sum = carry
    traj = micro_batch(trajectories, part, parts, axis=1)
    ex = micro_batch(examples, part, parts)
    idx = micro_batch(idx, part, parts)
    x_t = per_example(traj["latents"], idx)
    x_prev = per_example(traj["latents"], idx + 1)
    old = per_example(traj["log_probs"], idx)
    t = batch["timesteps"][idx]
    t_prev = batch["prev_timesteps"][idx]
    moments = lambda p: rollout_lib.step_moments(models, p, x_t, t, t_prev, ex["cond"],
                                                 ex["uncond"], batch["guidance_scale"],
                                                 batch["eta"], sampler=sampler)
    if kl_weight > 0:
      ref_mean, _ = moments(frozen["reference"])
      ref_mean = jax.lax.stop_gradient(ref_mean)

    def loss_fn(params):
      mean, std = moments(params)
      log_prob = steps.gaussian_log_prob(x_prev, mean, std)
      log_ratio = (log_prob - old) / elements
      ratio = jnp.exp(log_ratio)
      pg = ppo_loss(ratio, ex["advantages"], clip_range).mean()
      kl = (gaussian_kl(mean, ref_mean, std).mean() / elements if kl_weight > 0
            else jnp.zeros(()))
      aux = {"policy_loss": pg, "kl_reference": kl,
             "approx_kl": 0.5 * jnp.mean(jnp.square(log_ratio)),
             "clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32)),
             "ratio_mean": ratio.mean()}
      return pg + kl_weight * kl, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    aux["loss"] = loss
    grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
    metrics_sum = jax.tree.map(jnp.add, metrics_sum, aux)
    return (grads_sum, metrics_sum), None

  def body(carry, idx):
    """One chosen step of every trajectory, micro-batch by micro-batch."""
    return jax.lax.scan(lambda c, part: micro_step(c, part, idx), carry, jnp.arange(parts))

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  metric_names = ("policy_loss", "kl_reference", "approx_kl", "clip_fraction", "ratio_mean",
                  "loss")
  init = (zeros, {k: jnp.zeros((), jnp.float32) for k in metric_names})
  (grads_sum, metrics_sum), _ = jax.lax.scan(body, init, chosen.T)
  # Every micro-batch loss is a mean over equally many trajectories: their mean is the batch's.
  grads = jax.tree.map(lambda g: g / (count * parts), grads_sum)
  metrics = {k: v / (count * parts) for k, v in metrics_sum.items()}
  metrics["grad_norm"] = optax.global_norm(grads)
  new_state = state_lib.apply_gradients(state, grads, tx)
  new_state, metrics["nonfinite"] = guard.keep_finite(
      state, new_state, guard.all_finite(metrics["loss"], grads))
  return new_state, metrics
