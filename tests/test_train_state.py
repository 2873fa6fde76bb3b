"""Tests for fundax.train.state and fundax.train.optim: schedule, clipping, decay mask, EMA."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fundax.train import optim
from fundax.train import state as state_lib


def test_schedule_warmup_then_cosine():
  config = ml_collections.ConfigDict(
      {"lr": 1.0, "warmup_steps": 10, "total_steps": 110, "end_lr_factor": 0.1})
  schedule = optim.make_schedule(config)
  values = [float(schedule(s)) for s in (0, 5, 10, 60, 110)]
  # Linear to the peak, half-way down the cosine at the midpoint, end value at the end.
  np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)


def test_schedule_without_warmup_or_decay_is_constant_for_any_length():
  short, long = ({"lr": 0.5, "total_steps": n, "end_lr_factor": 1.0} for n in (4, 400))
  assert optim.is_constant(short) and optim.is_constant(long)
  for config in (short, long):
    np.testing.assert_array_equal([float(optim.make_schedule(config)(s)) for s in (0, 3, 399)],
                                  [0.5, 0.5, 0.5])
  assert not optim.is_constant({**short, "warmup_steps": 1})
  assert not optim.is_constant({**short, "end_lr_factor": 0.5})


def test_missing_field_and_bad_warmup():
  with pytest.raises(ValueError, match="'total_steps'"):
    optim.make_optimizer({"lr": 1.0})
  with pytest.raises(ValueError, match="warmup_steps < total_steps"):
    optim.make_schedule({"lr": 1.0, "total_steps": 5, "warmup_steps": 5})


def _updates(config, grads_seq, params):
  tx = optim.make_optimizer(config)
  opt_state = tx.init(params)
  out = []
  for grads in grads_seq:
    updates, opt_state = tx.update(grads, opt_state, params)
    out.append(updates)
  return out


def test_global_norm_clipping():
  params = {"w": jnp.ones((2, 2))}
  grads_seq = [{"w": jnp.full((2, 2), 50.0)}, {"w": jnp.array([[0.3, -0.1], [0.2, 0.4]])}]
  base = {"lr": 0.1, "total_steps": 10}
  clipped = _updates({**base, "grad_clip_norm": 1.0}, grads_seq, params)
  manual = [optax.clip_by_global_norm(1.0).update(g, None)[0] for g in grads_seq]
  reference = _updates(base, manual, params)
  unclipped = _updates(base, grads_seq, params)
  jax.tree.map(np.testing.assert_allclose, clipped, reference)
  assert not np.allclose(clipped[1]["w"], unclipped[1]["w"])


def test_weight_decay_skips_biases():
  params = {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.full((3,), 2.0)}
  zero = jax.tree.map(jnp.zeros_like, params)
  (updates,) = _updates({"lr": 0.5, "total_steps": 10, "weight_decay": 0.1}, [zero], params)
  np.testing.assert_allclose(updates["kernel"], -0.5 * 0.1 * 2.0)
  np.testing.assert_allclose(updates["bias"], 0.0)


def test_ema_update_by_hand():
  ema = {"a": jnp.array([1.0, 2.0])}
  new = optim.ema_update(ema, {"a": jnp.array([3.0, 2.0])}, 0.9)
  np.testing.assert_allclose(new["a"], [1.2, 2.0], rtol=1e-6)


def test_ema_warmup_by_hand():
  # diffusers' EMAModel: min(decay, (1 + step) / (10 + step)).
  got = [float(optim.ema_warmup(0.999, s)) for s in (0, 1, 10, 90, 100_000)]
  np.testing.assert_allclose(got, [0.1, 2 / 11, 11 / 20, 0.91, 0.999], rtol=1e-6)
  assert float(optim.ema_warmup(0.0, 5)) == 0.0


def test_apply_gradients():
  tx = optim.make_optimizer({"lr": 0.1, "total_steps": 10})
  state = state_lib.create({"w": jnp.ones((2, 2))}, tx, ema=True)
  assert int(state.step) == 0 and len(jax.tree.leaves(state)) >= 4
  grads = {"w": jnp.ones((2, 2))}
  new = state_lib.apply_gradients(state, grads, tx, ema_decay=0.5)
  assert int(new.step) == 1
  # Step 0 averages with decay min(0.5, 1 / 10): the warmup, not the configured 0.5.
  np.testing.assert_allclose(new.ema_params["w"], 0.1 * 1.0 + 0.9 * new.params["w"], rtol=1e-6)
  newer = state_lib.apply_gradients(new.replace(step=jnp.array(90)), grads, tx, ema_decay=0.5)
  np.testing.assert_allclose(newer.ema_params["w"],
                             0.5 * new.ema_params["w"] + 0.5 * newer.params["w"], rtol=1e-6)
  with pytest.raises(ValueError, match="ema_decay"):
    state_lib.apply_gradients(state, grads, tx)
  plain = state_lib.create({"w": jnp.ones((2, 2))}, tx)
  assert plain.ema_params is None
  assert int(state_lib.apply_gradients(plain, grads, tx).step) == 1
