"""Tests for the diffusion losses and the LDM train/eval steps on a tiny random model."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fundax.diffusion import losses
from fundax.diffusion import schedules
from fundax.models import ldm as ldm_lib
from fundax.train import ldm_step
from fundax.train import optim
from fundax.train import state as state_lib
from tiny_ldm import LENGTH, init_params, prompts, tiny_models


def test_min_snr_weights_by_hand():
  schedule = schedules.make_schedule(10, 0.1, 0.5, "linear")
  t = jnp.array([0, 5, 9])
  abar = np.cumprod(1 - np.linspace(0.1, 0.5, 10))[[0, 5, 9]]
  snr = abar / (1 - abar)  # [9.0, 0.3696..., 0.0268...]
  np.testing.assert_allclose(snr[0], 9.0, rtol=1e-6)
  gamma = 5.0
  eps = losses.min_snr_weights(schedule, t, gamma, "epsilon")
  v = losses.min_snr_weights(schedule, t, gamma, "v_prediction")
  x0 = losses.min_snr_weights(schedule, t, gamma, "sample")
  # Clamped at t=0 (SNR 9 > 5); weight 1 for epsilon where SNR < gamma.
  np.testing.assert_allclose(eps, [5.0 / 9.0, 1.0, 1.0], rtol=1e-5)
  np.testing.assert_allclose(v, [5.0 / 10.0, snr[1] / (snr[1] + 1), snr[2] / (snr[2] + 1)],
                             rtol=1e-5)
  np.testing.assert_allclose(x0, [5.0, snr[1], snr[2]], rtol=1e-5)


def test_min_snr_epsilon_weight_is_finite_at_zero_snr():
  schedule = schedules.make_schedule(10, 0.1, 0.5, "linear", rescale_betas_zero_snr=True)
  weights = losses.min_snr_weights(schedule, jnp.array([9]), 5.0, "epsilon")
  np.testing.assert_array_equal(weights, [1.0])


def test_diffusion_loss_targets_and_weights():
  schedule = schedules.make_schedule(10, 0.1, 0.5, "linear")
  x0 = jnp.ones((2, 2, 2, 1))
  noise = jnp.full((2, 2, 2, 1), 2.0)
  t = jnp.array([3, 3])
  zero = jnp.zeros_like(x0)
  np.testing.assert_allclose(losses.diffusion_loss(schedule, zero, x0, noise, t), [4.0, 4.0])
  abar = float(schedule.alphas_cumprod[3])
  v = abar**0.5 * 2.0 - (1 - abar)**0.5
  np.testing.assert_allclose(
      losses.diffusion_loss(schedule, zero, x0, noise, t, prediction_type="v_prediction",
                            weights=jnp.array([1.0, 0.5])), [v**2, 0.5 * v**2], rtol=1e-5)
  np.testing.assert_allclose(
      losses.diffusion_loss(schedule, zero, x0, noise, t, prediction_type="sample"), [1.0, 1.0])


@pytest.fixture(scope="module")
def tiny():
  models = tiny_models()
  return models, init_params(models)


def test_caption_dropout_probability_and_replacement(tiny):
  models, params = tiny
  batch = 4000
  states = jnp.ones((batch, LENGTH, 32))
  mask = jnp.ones((batch, LENGTH), jnp.int32)
  out, out_mask, dropped = ldm_step.drop_captions(models, params["text"], states, mask, 0.3,
                                                  jax.random.key(0))
  dropped = np.asarray(dropped)
  assert abs(dropped.mean() - 0.3) < 0.03  # 4.6 standard deviations
  empty, empty_mask = ldm_lib.empty_text(models, params["text"], LENGTH)
  np.testing.assert_allclose(np.asarray(out[dropped]),
                             np.broadcast_to(empty, (dropped.sum(), LENGTH, 32)), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out[~dropped]), 1.0)
  np.testing.assert_array_equal(np.asarray(out_mask[dropped]),
                                np.broadcast_to(empty_mask, (dropped.sum(), LENGTH)))
  _, _, none = ldm_step.drop_captions(models, params["text"], states, mask, 0.0,
                                      jax.random.key(0))
  assert not np.asarray(none).any()


def step_config(**kw):
  c = ml_collections.ConfigDict(dict(caption_dropout=0.1, snr_gamma=0.0, ema_decay=0.9))
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def overfit_setup(tiny):
  models, params = tiny
  ids, mask = prompts(batch=4)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
  batch = {"image": images, "input_ids": ids, "attention_mask": mask}
  frozen = {"vae": params["vae"], "text": params["text"]}
  return models, params, frozen, batch


@pytest.fixture(scope="module")
def train_fn(overfit_setup):
  """(tx, jitted train step): compiled once for the tests below."""
  models = overfit_setup[0]
  tx = optim.make_optimizer(dict(lr=2e-3, total_steps=1000, warmup_steps=0,
                                 grad_clip_norm=1.0))
  return tx, jax.jit(functools.partial(ldm_step.ldm_train_step, models=models, tx=tx,
                                       config=step_config(caption_dropout=0.0)))


def test_tiny_model_overfits_one_batch(overfit_setup, train_fn):
  models, params, frozen, batch = overfit_setup
  config = step_config(caption_dropout=0.0)
  tx, train = train_fn
  state = state_lib.create(params["unet"], tx, ema=True)
  evaluate = jax.jit(functools.partial(ldm_step.ldm_eval_step, models=models, config=config))
  eval_rng = jax.random.key(7)
  before = float(evaluate(state.params, batch, eval_rng, frozen)["loss"])
  rng = jax.random.key(1)
  for _ in range(60):
    state, metrics = train(state, batch, rng, frozen)
  after = float(evaluate(state.params, batch, eval_rng, frozen)["loss"])
  assert int(state.step) == 60
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  assert after < 0.5 * before, (before, after)
  # The EMA moved from the initial params towards the trained ones.
  moved = jax.tree.leaves(jax.tree.map(lambda e, p0: jnp.abs(e - p0).max(), state.ema_params,
                                       params["unet"]))
  assert max(float(m) for m in moved) > 0


def test_cached_latents_and_embeddings_match_encoding(overfit_setup):
  """A batch with cached "latents"/"text_embeddings" gives the same step as encoding."""
  models, params, frozen, batch = overfit_setup
  config = step_config(caption_dropout=0.5, snr_gamma=5.0)
  rng = jax.random.fold_in(jax.random.key(3), 0)
  rng_latent = jax.random.split(rng, 4)[0]
  cached = {  # jitted, as in training (op by op, each call compiles hundreds of small programs)
      "latents": jax.jit(functools.partial(ldm_step.encode_latents, models))(
          frozen["vae"], batch["image"], rng_latent),
      "text_embeddings": ldm_lib.encode_text(models, frozen["text"], batch["input_ids"],
                                             batch["attention_mask"]),
      "attention_mask": batch["attention_mask"],
  }
  evaluate = jax.jit(functools.partial(ldm_step.ldm_eval_step, models=models, config=config))
  rng = jax.random.key(3)
  a = evaluate(params["unet"], batch, jax.random.fold_in(rng, 0), frozen)
  b = evaluate(params["unet"], cached, jax.random.fold_in(rng, 0), frozen)
  np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-5)


def test_nonfinite_loss_skips_the_update(overfit_setup, train_fn):
  """A NaN in the batch: params, optimizer state and EMA unchanged, step counted and advanced."""
  _, params, frozen, batch = overfit_setup
  tx, train = train_fn
  state = state_lib.create(params["unet"], tx, ema=True)
  poisoned = {**batch, "image": batch["image"].at[1, 5, 5, 0].set(jnp.nan)}
  after, metrics = train(state, poisoned, jax.random.key(1), frozen)
  assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
  assert int(after.step) == 1
  for name in ("params", "opt_state", "ema_params"):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(state, name))
  # The next finite batch updates as usual.
  final, metrics = train(after, batch, jax.random.key(1), frozen)
  assert float(metrics["nonfinite"]) == 0.0 and int(final.step) == 2
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.abs(a - b).max(), final.params,
                                       state.params))
  assert max(float(m) for m in moved) > 0
