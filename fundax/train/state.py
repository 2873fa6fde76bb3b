"""The train state: a plain pytree of arrays, nothing else.

The model and the optimizer are closures held by the caller, never fields of the state, so
the state can be sharded leaf by leaf (`parallel.state_shardings`), donated to a jitted step,
and saved or restored by Orbax as one array tree. Frozen networks (VAE, text encoder) live in a
separate pytree passed to the step, not here.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fundax.train import optim


@flax.struct.dataclass
class TrainState:
  """Arrays of a training run.

  Attributes:
    step: int32 scalar, the number of optimizer updates applied so far.
    params: the trained parameters (a nested dict).
    opt_state: the optax state for `params`.
    ema_params: exponential moving average of `params`, or None when not tracked.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None


def create(params: Any, optimizer: optax.GradientTransformation, *,
           ema: bool = False) -> TrainState:
  """A fresh state at step 0: new optimizer state, EMA (if any) starting at `params`.

  Args:
    params: initial parameters.
    optimizer: the optax transformation (e.g. from `optim.make_optimizer`).
    ema: whether to track `ema_params`.

  Returns:
    The TrainState. Wrap the call in `parallel.init_sharded` to create it already sharded.
  """
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      ema_params=jax.tree.map(jnp.array, params) if ema else None)


def apply_gradients(state: TrainState, grads: Any, optimizer: optax.GradientTransformation,
                    ema_decay: float | jax.Array | None = None) -> TrainState:
  """One optimizer update (and EMA update when the state tracks one).

  Args:
    state: the current state.
    grads: gradients with the structure of `state.params`.
    optimizer: the optax transformation the state was created with.
    ema_decay: EMA decay per step; required when `state.ema_params` is not None. May be a
      traced value (a schedule), so changing it does not recompile. Early steps use less
      (`optim.ema_warmup`), so a short run's average is not mostly its random init.

  Returns:
    The state after the update, with `step + 1`.

  Raises:
    ValueError: the state tracks an EMA but no decay was given.
  """
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    if ema_decay is None:
      raise ValueError("the state tracks ema_params: pass ema_decay")
    ema_params = optim.ema_update(ema_params, params, optim.ema_warmup(ema_decay, state.step))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       ema_params=ema_params)
