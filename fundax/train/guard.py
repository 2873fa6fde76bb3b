"""Skipping optimizer updates whose loss or gradients are not finite.

A single NaN/inf batch (an fp16/bf16 overflow, a corrupt image, a too-high learning rate for
one step) must not poison the params, the optimizer moments and the EMA for the rest of a run.
`keep_finite` selects, leaf by leaf inside the jitted step, between the updated state and the
state it came from: when the loss and the gradients are all finite the update is kept;
otherwise the old params, optimizer state and EMA are kept and only `step` advances (so the
next step draws new randomness and the next batch). The step reports `nonfinite` in its
metrics; `fundax.train.loop.train_loop` counts those and stops a run after too many in a row.

Pure and jittable; the select costs one pass over the state, which XLA fuses with the update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fundax.train import state as state_lib


def all_finite(loss: jax.Array, grads: Any) -> jax.Array:
  """bool scalar: the loss and every gradient entry are finite (NaN and inf are not)."""
  return jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))


def keep_finite(old: state_lib.TrainState, new: state_lib.TrainState, finite: jax.Array
                ) -> tuple[state_lib.TrainState, jax.Array]:
  """The new state when `finite`, else the old one with its step advanced by one.

  Args:
    old: the state the step started from.
    new: the state after the update (`step == old.step + 1`).
    finite: bool scalar, e.g. `all_finite(loss, grads)`.

  Returns:
    (state, nonfinite): the state to continue from, and 1.0 when the update was skipped else
    0.0 (float32, a metric).
  """
  kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new.replace(step=old.step),
                      old)
  return kept.replace(step=new.step), jnp.logical_not(finite).astype(jnp.float32)
