"""The RLHF loop on a tiny random LDM: the update's first ratio is 1, a toy reward climbs, a run
resumed mid-round (after stop_after_phase, or a SIGTERM during round 0's evaluation or a stage)
equals an uninterrupted one, NaN/inf updates are skipped and NaN/inf held-out readings stop the
run, and the guard stops a run that games its reward."""

import dataclasses
import functools
import json
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fundax import checkpoint
from fundax import configlib
from fundax import parallel
from fundax import sampling
from fundax.data import tokenizer as tokenizer_lib
from fundax.models import bert
from fundax.models import text_encoder as text_lib
from fundax.rl import ddpo
from fundax.rl import reward as reward_lib
from fundax.rl import rollout as rollout_lib
from fundax.rl import rounds
from fundax.rl import run_state
from fundax.train import loop as loop_lib
from fundax.train import state as state_lib
import tiny_ldm


@pytest.fixture(scope="module")
def ldm_dir(tmp_path_factory):
  """The tiny LDM's checkpoint with a BERT of the real uncased vocabulary (so the MiniLM
  tokenizer's ids are valid)."""
  models = dataclasses.replace(
      tiny_ldm.tiny_models(),
      text=text_lib.TextEncoder(bert.BertConfig(vocab_size=30522, hidden_size=32,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=64)),
      special_tokens=text_lib.special_tokens(tokenizer_lib.minilm_dir()))
  return tiny_ldm.save_checkpoint(tmp_path_factory.mktemp("ldm"), models,
                                  tiny_ldm.init_params(models))


def darkness(images, prompts):
  """A held-out metric that falls exactly when the toy reward (brightness) rises."""
  del prompts
  return {"darkness": float(-np.mean(images))}


def make_config(ldm_dir, **overrides):
  config = configlib.load_config("configs/rlhf.py:test")
  items = {"ldm_checkpoint": ldm_dir, **overrides}
  return configlib.apply_overrides(config, [f"{k}={v}" for k, v in items.items()])


@pytest.fixture(scope="module")
def loop(ldm_dir, tmp_path_factory):
  """The tiny loop, rewarded by a reward registered here and chosen by name in its config."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(reward_lib, "_REWARDS", dict(reward_lib._REWARDS))  # registered for this loop
    reward_lib.register_reward("test_brightness")(lambda config: reward_lib.mean_brightness)
    yield rounds.build_loop(make_config(ldm_dir, reward="test_brightness"),
                            tmp_path_factory.mktemp("loop"), heldout_fn=darkness)


@pytest.fixture(scope="module")
def policy(loop):
  """The loop's UNet params and frozen arrays placed as `rounds.run` places them (replicated
  over the loop's mesh), so that the tests' rollouts and updates call the programs the runs
  below compile instead of compiling them again for uncommitted host arrays."""
  params = jax.device_put(loop.pipeline.params, parallel.replicated(loop.mesh))
  return params["unet"], {"vae": params["vae"], "text": params["text"]}


def new_state(loop, tx):
  """A train state of the loop's UNet placed as `rounds.run` places it (replicated over the
  loop's mesh): the update's output state has that placement, so a state placed otherwise
  would compile the update a second time at its second call."""
  return jax.jit(lambda p: state_lib.create(p, tx), out_shardings=parallel.replicated(loop.mesh))(
      loop.pipeline.params["unet"])


def test_the_config_names_the_reward(loop):
  assert loop.reward is reward_lib.mean_brightness


def test_loops_of_the_same_models_and_settings_share_their_jitted_steps(loop, ldm_dir, tmp_path):
  """A loop built again in one process (a resumed or repeated run, a longer run, an ablation's
  arm) reuses the steps' traces and compiles; a step whose own settings change gets its own."""
  def build(**overrides):
    return rounds.build_loop(make_config(ldm_dir, **overrides), tmp_path / "again",
                             reward_fn=reward_lib.mean_brightness, heldout_fn=darkness)

  steps = (loop.tx, loop.rollout_fn, loop.ddpo_fn, loop.rwr_fn)
  # Loop settings (rounds, batches per stage, the PPO clip, a traced input) share every step.
  longer = build(num_rounds=3, **{"stage1.iterations": 2, "stage1.clip_range": 0.3})
  assert (longer.tx, longer.rollout_fn, longer.ddpo_fn, longer.rwr_fn) == steps
  # A DDPO setting: a new DDPO update only; a stage-2 setting: a new RWR update only.
  kl = build(**{"stage1.kl_weight": 0.5})
  assert kl.ddpo_fn is not loop.ddpo_fn
  assert (kl.tx, kl.rollout_fn, kl.rwr_fn) == (loop.tx, loop.rollout_fn, loop.rwr_fn)
  beta = build(**{"stage2.negative_beta": 5.0})
  assert beta.rwr_fn is not loop.rwr_fn and beta.ddpo_fn is loop.ddpo_fn
  # A decaying learning rate depends on the run's length: new updates, the same rollout.
  decay = build(**{"optim.end_lr_factor": 0.1})
  assert decay.ddpo_fn is not loop.ddpo_fn and decay.rollout_fn is loop.rollout_fn
  assert build(**{"optim.end_lr_factor": 0.1, "num_rounds": 2}).ddpo_fn is not decay.ddpo_fn


def test_update_recomputes_the_rollout_log_probs(loop, policy):
  unet, frozen = policy
  texts, key = loop.draw(0, 0, 0)
  ro = loop.sample(unet, frozen, texts, key)
  t_steps, b = ro.log_probs.shape
  assert ro.latents.shape == (t_steps + 1, b, 16, 16, 4) and ro.images.shape == (b, 32, 32, 3)
  lp = np.asarray(ro.log_probs)
  assert np.all(lp[:-1] != 0) and np.all(lp[-1] == 0)  # the last DDIM step is deterministic
  # Scored again inside the jitted update: the first inner step's importance ratio is 1.
  c = loop.config.rollout
  state = new_state(loop, loop.tx)
  batch = {"latents": ro.latents, "log_probs": ro.log_probs, "timesteps": ro.timesteps,
           "prev_timesteps": ro.prev_timesteps,
           "advantages": loop.shard(jnp.linspace(-1.0, 1.0, b)),  # split over the batch as a run's
           "cond": ro.cond, "uncond": ro.uncond, "guidance_scale": jnp.float32(c.guidance_scale),
           "eta": jnp.float32(c.eta), "clip_range": jnp.float32(0.2)}
  _, metrics = loop.ddpo_fn(state, batch, jax.random.key(0), {"reference": unet})
  metrics = jax.device_get(metrics)
  assert abs(float(metrics["ratio_mean"]) - 1.0) < 1e-3
  assert float(metrics["approx_kl"]) < 1e-5 and float(metrics["clip_fraction"]) == 0.0
  assert float(metrics["kl_reference"]) < 1e-4  # the policy is the reference
  assert float(metrics["grad_norm"]) > 0 and float(metrics["nonfinite"]) == 0
  # A NaN advantage makes the loss NaN: the update is skipped, only the step advances.
  state = new_state(loop, loop.tx)
  before = jax.device_get(state)
  batch["advantages"] = loop.shard(batch["advantages"].at[0].set(jnp.nan))
  skipped, metrics = loop.ddpo_fn(state, batch, jax.random.key(0), {"reference": unet})
  assert float(metrics["nonfinite"]) == 1 and int(skipped.step) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get((skipped.params, skipped.opt_state)),
               (before.params, before.opt_state))


def test_micro_batched_update_equals_the_whole_batch_update(loop, policy):
  """stage1.micro_batches only splits the backward pass: same update, same metrics."""
  unet, frozen = policy
  c = loop.config.rollout
  texts, key = loop.draw(0, 0, 0)
  ro = loop.sample(unet, frozen, texts, key)
  b = ro.log_probs.shape[1]
  batch = {"latents": ro.latents, "log_probs": ro.log_probs, "timesteps": ro.timesteps,
           "prev_timesteps": ro.prev_timesteps, "advantages": jnp.linspace(-1.0, 1.0, b),
           "cond": ro.cond, "uncond": ro.uncond, "guidance_scale": jnp.float32(c.guidance_scale),
           "eta": jnp.float32(c.eta), "clip_range": jnp.float32(0.2)}
  tx = optax.sgd(1.0)  # the new params are params - grads: compares the gradients themselves
  state = new_state(loop, tx)
  results = {}
  for parts in (1, 2):
    stage1 = loop.config.stage1.copy_and_resolve_references()
    with stage1.unlocked():
      stage1.micro_batches = parts
    update = jax.jit(functools.partial(
        ddpo.ddpo_update_step, models=loop.pipeline.models, tx=tx, config=stage1,
        sampler=c.sampler, stochastic=rollout_lib.stochastic_steps(loop.pipeline.models,
                                                                  c.sampler, c.num_steps)))
    results[parts] = jax.device_get(update(state, batch, jax.random.key(0),
                                           {"reference": unet}))
  (whole, whole_metrics), (split, metrics) = results[1], results[2]
  # Gradients of order 1e-2, sums over the batch of terms whose advantages cancel: float32
  # summation order moves them by up to ~2e-5 (on one device); a wrong split or scaling of the
  # micro-batches moves them by their own size.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5),
               split.params, whole.params)
  # Likewise the policy loss, a small difference of O(1) terms.
  for name in ("loss", "policy_loss", "kl_reference", "grad_norm"):
    np.testing.assert_allclose(metrics[name], whole_metrics[name], rtol=1e-4, atol=5e-5)
  assert float(whole_metrics["grad_norm"]) > 0
  bad = loop.config.stage1.copy_and_resolve_references()
  with bad.unlocked():
    bad.micro_batches = 3
  with pytest.raises(ValueError, match="micro_batches"):
    ddpo.ddpo_update_step(state, batch, jax.random.key(0), {"reference": unet},
                          models=loop.pipeline.models, tx=tx, config=bad, sampler=c.sampler,
                          stochastic=rollout_lib.stochastic_steps(loop.pipeline.models,
                                                                  c.sampler, c.num_steps))


def test_toy_reward_goes_up(loop, policy):
  """DDPO updates rewarded by mean brightness: the batch's prompts, sampled again with the
  same noise after each update, come out brighter within three updates."""
  unet, frozen = policy
  c = loop.config.rollout
  stage1 = loop.config.stage1.copy_and_resolve_references()
  with stage1.unlocked():
    stage1.timestep_fraction = 1.0
  tx = optax.adam(1e-3)
  update = jax.jit(functools.partial(
      ddpo.ddpo_update_step, models=loop.pipeline.models, tx=tx, config=stage1,
      sampler=c.sampler, stochastic=rollout_lib.stochastic_steps(loop.pipeline.models,
                                                                c.sampler, c.num_steps)))
  state = new_state(loop, tx)
  texts, key = loop.draw(0, 0, 0)
  rewards = []
  for i in range(4):
    ro = loop.sample(state.params, frozen, texts, key)
    reward = reward_lib.mean_brightness(np.asarray(ro.images), texts)
    rewards.append(float(reward.mean()))
    if i == 3:
      break
    batch = {"latents": ro.latents, "log_probs": ro.log_probs, "timesteps": ro.timesteps,
             "prev_timesteps": ro.prev_timesteps,
             "advantages": jnp.asarray((reward - reward.mean()) / (reward.std() + 1e-6)),
             "cond": ro.cond, "uncond": ro.uncond,
             "guidance_scale": jnp.float32(c.guidance_scale), "eta": jnp.float32(c.eta),
             "clip_range": jnp.float32(loop.config.stage1.clip_range)}
    state, _ = update(state, batch, jax.random.key(i), {"reference": unet})
  assert max(rewards[1:]) > rewards[0] + 0.01, rewards


@pytest.fixture(scope="module")
def straight(ldm_dir, tmp_path_factory):
  """One uninterrupted run of the test config (one round), for the resume tests to match."""
  workdir = tmp_path_factory.mktemp("straight")
  out = rounds.run(make_config(ldm_dir), str(workdir), reward_fn=reward_lib.mean_brightness,
                   heldout_fn=darkness)
  return out, checkpoint.restore_params(workdir)["state"]["params"]


def assert_same_run(straight, out, workdir):
  a, params_a = straight
  assert a["queries"] == out["queries"] == 16
  assert a["accepted_fraction"] == out["accepted_fraction"]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
               params_a, checkpoint.restore_params(workdir)["state"]["params"])
  assert a["heldout_after"] == pytest.approx(out["heldout_after"], rel=1e-5)


def test_resume_mid_round_equals_uninterrupted(ldm_dir, straight, tmp_path):
  first = rounds.run(make_config(ldm_dir, stop_after_phase=1), str(tmp_path),
                     reward_fn=reward_lib.mean_brightness, heldout_fn=darkness)
  assert first["rounds_done"] == 0  # stopped between stage 1 and stage 2 of round 0
  assert "stage 1 of 2 (stop_after_phase)" in first["unfinished"]
  b = rounds.run(make_config(ldm_dir), str(tmp_path), reward_fn=reward_lib.mean_brightness,
                 heldout_fn=darkness)
  assert "unfinished" not in b
  assert_same_run(straight, b, tmp_path)
  # The kept model samples through the public API.
  pipeline = sampling.load_pipeline(straight[0]["best_checkpoint"])
  assert pipeline.params["unet"].keys() == straight[1].keys()


def test_sigterm_in_round_0_evaluation_or_a_stage_saves_and_the_reruns_end_the_same(
    ldm_dir, straight, tmp_path, monkeypatch):
  """SIGTERM during round 0's held-out evaluation, then (in the rerun) during stage 1: each
  run finishes what it is doing, saves, restores the signal handler and returns preempted;
  the next run neither repeats it nor skips anything, and the third ends as the
  uninterrupted run."""
  evaluate_round, stage1 = rounds.evaluate_round, rounds.stage1
  evaluated = []

  def sigterm_then(function):
    def call(*args, **kwargs):
      os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-call: the call still runs to its end
      return function(*args, **kwargs)
    return call

  def counted(loop, params, frozen, round_, progress):
    evaluated.append(round_)
    return evaluate_round(loop, params, frozen, round_, progress)

  def run():
    return rounds.run(make_config(ldm_dir), str(tmp_path), reward_fn=reward_lib.mean_brightness,
                      heldout_fn=darkness)

  previous = signal.getsignal(signal.SIGTERM)
  monkeypatch.setattr(rounds, "evaluate_round", sigterm_then(counted))
  stopped = run()
  assert signal.getsignal(signal.SIGTERM) is previous
  assert stopped["preempted"] == "SIGTERM" and stopped["rounds_done"] == 0
  assert "after stage 0 of 2" in stopped["unfinished"] and evaluated == [0]
  assert checkpoint.restore_params(tmp_path, fields=("step",))["step"] == 0

  monkeypatch.setattr(rounds, "evaluate_round", counted)
  monkeypatch.setattr(rounds, "stage1", sigterm_then(stage1))
  stopped = run()
  assert stopped["preempted"] == "SIGTERM" and stopped["rounds_done"] == 0
  assert "after stage 1 of 2" in stopped["unfinished"] and evaluated == [0]
  saved = checkpoint.restore_params(tmp_path, fields=("step",))
  assert saved["step"] == 1 and int(saved["state"]["step"]) == 2  # both inner epochs ran

  monkeypatch.setattr(rounds, "stage1", stage1)
  again = run()
  assert "unfinished" not in again and again["rounds_done"] == 1 and evaluated == [0, 1]
  assert_same_run(straight, again, tmp_path)


def test_nan_heldout_readings_stop_the_run(loop, policy, monkeypatch):
  """A metric NaN from round 0 on measures nothing and is kept (the composite leaves it out);
  one that round 0 measured turning NaN stops the run without recording the round."""
  unet, frozen = policy
  progress = run_state.RunState.initial("")
  nan = float("nan")
  monkeypatch.setattr(loop, "heldout_fn", lambda images, prompts: {"darkness": 0.5,
                                                                   "unread": nan})
  progress.history.append(rounds.evaluate_round(loop, unet, frozen, 0, progress))
  monkeypatch.setattr(loop, "heldout_fn", lambda images, prompts: {"darkness": nan,
                                                                   "unread": nan})
  with pytest.raises(loop_lib.NonFiniteMetricError, match=r"\['darkness'\] are NaN/inf"):
    rounds.evaluate_round(loop, unet, frozen, 1, progress)
  assert len(progress.history) == 1  # nothing recorded


def test_run_state_round_trips_through_the_checkpoint_json():
  progress = run_state.RunState(
      selector=run_state.SelectorVersion(2, "/runs/selector/v2"), phase=3,
      tracker={"a prompt": [0.5, 0.25]}, history=[{"round": 0, "reward": 0.5}], queries=16,
      train_reward={0: 0.5, 1: float("nan")}, accepted_fraction={0: 0.25})
  extras = json.loads(json.dumps(progress.to_json()))
  assert set(extras["train_reward"]) == {"0", "1"}  # JSON object keys are strings
  back = run_state.RunState.from_json(extras)
  assert back.selector == progress.selector and back.train_reward.keys() == {0, 1}
  assert np.isnan(back.train_reward[1])
  back.train_reward[1] = progress.train_reward[1] = 0.0
  assert back == progress


class RiggedReward:
  """A gamed judge: each new set of images scores higher than every set seen before it."""

  def __init__(self):
    self.seen = {}

  def __call__(self, images, prompts):
    key = np.asarray(images).tobytes()
    self.seen.setdefault(key, 0.1 * (len(self.seen) + 1))
    return np.full(len(images), self.seen[key], np.float32)


def test_guard_stops_and_keeps_the_best_round(ldm_dir, tmp_path):
  quality = iter([0.9, 0.5, 0.1])

  def falling(images, prompts):
    return {"quality": next(quality)}

  config = make_config(ldm_dir, num_rounds=2, **{"guard.tolerance": 0.1})
  out = rounds.run(config, str(tmp_path), reward_fn=RiggedReward(), heldout_fn=falling)
  assert out["stopped"] and out["rounds_done"] == 1 and out["best_round"] == 0
  assert "Selector reward rose" in out["stop_reason"]
  kept = sampling.load_pipeline(out["best_checkpoint"])
  start = sampling.load_pipeline(ldm_dir)
  jax.tree.map(np.testing.assert_array_equal, kept.params["unet"], start.params["unet"])
  page = (tmp_path / "report" / "report.html").read_text()
  assert "SYNTHETIC" in page and "Selector reward rose" in page
  for name in ("curves", "curves_queries", "grid_before", "grid_after"):
    assert (tmp_path / "report" / f"{name}.png").stat().st_size > 1000


def test_ablation_runs_every_arm_on_the_same_budget(ldm_dir, tmp_path):
  """`fundax rlhf-ablate`'s work: each arm a full run on the same Selector queries, a table row
  per arm whose "kept" figures are its kept round's, and the curves."""
  from fundax.rl import ablation  # pylint: disable=g-import-not-at-top
  config = make_config(ldm_dir, **{"guard.enabled": False})
  out = ablation.run(config, str(tmp_path), reward_fn=reward_lib.mean_brightness,
                     heldout_fn=darkness)
  results = out["results"]
  assert list(results) == list(ablation.ARMS)
  assert {r["queries"] for r in results.values()} == {2 * 8}
  rows = (tmp_path / "ablation.md").read_text().splitlines()[2:]
  assert [row.split(" | ")[0].strip("| ") for row in rows] == list(ablation.ARMS)
  saved = json.loads((tmp_path / "ablation.json").read_text())["arms"]
  for arm, r in results.items():
    kept = saved[arm]["history"][r["best_round"]]
    assert r["reward_kept"] == pytest.approx(kept["reward"])
    assert r["heldout_kept"]["darkness"] == pytest.approx(kept["metrics"]["darkness"])
    assert f"{r['composite_kept']:.4f}" in rows[list(results).index(arm)]
  # DDPO-only never reaches stage 2; RWR-only never runs stage 1.
  records = {arm: [json.loads(line) for line in
                   (tmp_path / arm / "metrics.jsonl").read_text().splitlines()] for arm in results}
  splits = {arm: {r["split"] for r in rows} for arm, rows in records.items()}
  assert "stage2" not in splits["ddpo_only"] and "stage1" not in splits["rwr_only"]
  assert {"stage1", "stage2"} <= splits["both"]
  # The stage-1-only round: both batches' inner epochs are logged with their statistics.
  stage1 = [r for r in records["ddpo_only"] if r["split"] == "stage1"]
  assert [r["step"] for r in stage1] == [1, 2, 3, 4]
  for name in ("approx_kl", "clip_fraction", "reward_mean", "advantage_std", "kl_reference"):
    assert all(np.isfinite(r[name]) for r in stage1)
  assert pathlib.Path(out["curves"]).stat().st_size > 1000
