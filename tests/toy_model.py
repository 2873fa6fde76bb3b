"""A toy regression model and train step shared by the sharding, checkpoint and multi-host tests.

A 2-layer MLP on 16 features, trained with `fundax.train` (AdamW, clipping, EMA) by a step
written as single-device math, exactly as the real trainers are: `step(state, batch, rng)`
derives its randomness as `fold_in(rng, state.step)`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fundax import parallel
from fundax.train import optim
from fundax.train import state as state_lib

FEATURES = 16
HIDDEN = 64
# Small enough that the toy's kernels (16x64, 64x64) are sharded by the fsdp tactic.
FSDP_MIN_SIZE = 256
OPTIM = {"lr": 1e-2, "total_steps": 100, "warmup_steps": 2, "weight_decay": 1e-3,
         "grad_clip_norm": 1.0, "ema_decay": 0.9}


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):  # [B, FEATURES] -> [B, 1]
    x = nn.gelu(nn.Dense(HIDDEN)(x))
    x = nn.gelu(nn.Dense(HIDDEN)(x))
    return nn.Dense(1)(x)


MODEL = MLP()
OPTIMIZER = optim.make_optimizer(OPTIM)


def init_params(rng):
  return MODEL.init(rng, jnp.zeros((1, FEATURES)))["params"]


def init_state(rng):
  return state_lib.create(init_params(rng), OPTIMIZER, ema=True)


def train_step(state, batch, rng):
  rng_noise = jax.random.fold_in(rng, state.step)
  # Label noise from the step key: a resumed run must replay it exactly.
  target = batch["y"] + 0.01 * jax.random.normal(rng_noise, batch["y"].shape)

  def loss_fn(params):
    pred = MODEL.apply({"params": params}, batch["x"])
    return jnp.mean((pred - target) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  state = state_lib.apply_gradients(state, grads, OPTIMIZER, optim.ema_decay(OPTIM))
  return state, {"loss": loss}


def global_batch(index, batch_size=16):
  """The global batch number `index`, a pure function of it (numpy, host-side)."""
  rng = np.random.default_rng([7, index])
  x = rng.normal(size=(batch_size, FEATURES)).astype(np.float32)
  y = np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)
  return {"x": x, "y": y}


def make_trainer(mesh, rules=None):
  """Returns (abstract_state, init, step) for `mesh`: the sharded restore target, sharded
  state creation, and the step jitted with its shardings."""
  rng = jax.random.key(0)
  abstract = parallel.abstract_sharded(init_state, rng, mesh, rules, fsdp_min_size=FSDP_MIN_SIZE)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  step = parallel.jit_step(train_step, shardings, parallel.batch_sharding(mesh))

  def init():
    return parallel.init_sharded(init_state, rng, mesh, rules, fsdp_min_size=FSDP_MIN_SIZE)

  return abstract, init, step
