"""The train loop's early exits (SIGTERM, non-finite losses) and the trainers' config checks.

The loop is driven by a host-side fake step (no compile), so these tests take a second; the
real trainers' SIGTERM resume and NaN skipping are covered in test_trainers.py,
test_ldm_step.py, test_selector*.py, test_eval_evaluator.py and test_rl_loop.py.
"""

import itertools
import json
import os
import signal

import pytest

from fundax import configlib
from fundax.train import loop
from fundax.train import metric_writers
from fundax.trainers import ldm
from fundax.trainers import vae


class FakeState:
  def __init__(self, step=0, value=0.0):
    self.step, self.value = step, value


def fake_step(nonfinite_at=()):
  """A step that adds 1 to the state's value, or skips (value kept) at the given steps."""
  def step_fn(state, batch, rng):
    del batch, rng
    step = state.step + 1
    if step in nonfinite_at:
      return FakeState(step, state.value), {"loss": float("nan"), "nonfinite": 1.0}
    return FakeState(step, state.value + 1), {"loss": 1.0 / step, "nonfinite": 0.0}
  return step_fn


def run_loop(tmp_path, step_fn, *, num_steps=6, hooks=(), max_nonfinite=3, start=0):
  saved = []
  with metric_writers.MetricWriter(tmp_path) as writer:
    result = loop.train_loop(
        FakeState(start), step_fn=step_fn, batches=itertools.repeat({"x": 0}),
        batch_keys=("x",), rng=None, num_steps=num_steps, writer=writer, log_every=1,
        checkpoint_every=100, save=lambda step, state: saved.append((step, state.value)),
        hooks=hooks, max_nonfinite=max_nonfinite)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  return result, saved, records


def test_nonfinite_steps_are_counted_and_skipped(tmp_path):
  result, saved, records = run_loop(tmp_path, fake_step(nonfinite_at={2, 4, 5}))
  assert not result.preempted and result.nonfinite_steps == 3
  assert result.state.step == 6 and result.state.value == 3  # three real updates
  assert [r["nonfinite_total"] for r in records] == [0, 1, 1, 2, 3, 3]
  assert saved == [(6, 3)]


def test_run_stops_after_consecutive_nonfinite_steps(tmp_path):
  with pytest.raises(loop.NonFiniteLossError, match="3 consecutive steps"):
    run_loop(tmp_path, fake_step(nonfinite_at={2, 3, 4}), num_steps=10, max_nonfinite=3)
  # Saved the last finite state (value 1, after step 1) before raising, at step 4 or 5.
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in records) <= 5


def test_sigterm_saves_the_current_step_and_returns(tmp_path):
  def send_sigterm(step, state):
    del state
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  previous = signal.getsignal(signal.SIGTERM)
  every_step = loop.Hook(1, send_sigterm)
  result, saved, records = run_loop(tmp_path / "a", fake_step(), hooks=[every_step])
  # The signal arrives during step 3's hooks: step 4 runs, is saved, and the loop returns.
  assert result.preempted and result.state.step == 4
  assert saved == [(4, 4)]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert signal.getsignal(signal.SIGTERM) is previous  # the handler is restored
  # Resuming from the saved step finishes the run.
  resumed, saved, _ = run_loop(tmp_path / "b", fake_step(), start=4)
  assert not resumed.preempted and resumed.state.step == 6 and saved == [(6, 2)]


def test_a_loop_without_checkpoints_leaves_signals_alone():
  """`save=None` (the TSTR and C2ST classifiers): nothing to resume, so no handler is installed,
  and nothing is written."""
  handlers = []

  def step_fn(state, batch, rng):
    handlers.append(signal.getsignal(signal.SIGTERM))
    return fake_step()(state, batch, rng)

  previous = signal.getsignal(signal.SIGTERM)
  result = loop.train_loop(
      FakeState(), step_fn=step_fn, batches=itertools.repeat({"x": 0}), batch_keys=None,
      rng=None, num_steps=3, writer=None, log_every=1, checkpoint_every=1, save=None)
  assert result.state.step == 3 and not result.preempted
  assert handlers == [previous] * 3


def test_a_nested_loop_leaves_the_signal_to_the_outer_one(tmp_path):
  """A loop inside another preemptible unit of work (a Selector retrained in an RLHF stage)
  runs to its end; the outer context holds the signal and stops after its unit."""
  def sigterm_at_2(step, state):
    del state
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  previous = signal.getsignal(signal.SIGTERM)
  with loop.Preemption() as outer:
    result, saved, _ = run_loop(tmp_path, fake_step(), hooks=[loop.Hook(1, sigterm_at_2)])
    assert not result.preempted and result.state.step == 6 and saved == [(6, 6)]
    assert outer.signal == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is previous


def tiny(name, *overrides):
  return configlib.apply_overrides(configlib.load_config(f"configs/{name}.py:tiny"),
                                   list(overrides))


@pytest.mark.parametrize("overrides,message", [
    (["batch_size=12"], "batch_size 12 is not a positive multiple of the 8 data-parallel"),
    (["mesh.data=3"], "mesh:"),
    (["sample.sampler=euler"], "sample.sampler must be one of"),
    (["resolution=34"], "resolution 34 must be a multiple of 4"),
    (["train.caption_dropout=1.5", "num_steps=0"], "caption_dropout must be in [0, 1]"),
    (["unet.norm_num_groups=12"], "multiples of unet.norm_num_groups 12"),
    (["canonical_eye=left"], "canonical_eye must be one of"),
    (["canonical_eye=right", "flip=False"], "canonical_eye mirrors the other eye's images"),
    (["scheduler.timestep_spacing=middle"], "scheduler.timestep_spacing must be"),
])
def test_ldm_config_errors_before_compute(tmp_path, overrides, message):
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match="invalid LDM config") as info:
    ldm.run(tiny("ldm", *overrides), str(workdir))
  assert message in str(info.value)
  assert not workdir.exists()  # failed before the dataset build


def test_ldm_config_lists_every_problem():
  with pytest.raises(ValueError) as info:
    ldm.validate_config(tiny("ldm", "batch_size=12", "sample.sampler=euler", "num_steps=0"))
  assert str(info.value).count(";") == 2


def test_vae_config_errors_before_compute(tmp_path):
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match="invalid VAE config") as info:
    vae.run(tiny("vae", "resolution=33", "eval_batch_size=4", "train.recon=l3"), str(workdir))
  for message in ("resolution 33 is not a multiple of the VAE's downsampling factor 2",
                  "eval_batch_size 4", "train.recon must be"):
    assert message in str(info.value)
  assert not workdir.exists()


def test_missing_unet_init_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothere"):
    ldm.validate_config(tiny("ldm", f"unet_init={tmp_path / 'nothere'}"))


@pytest.mark.parametrize("spec", ["configs/ldm.py", "configs/ldm.py:base",
                                  "configs/sd15_fundus.py", "configs/vae.py:base"])
def test_shipped_configs_are_valid(spec):
  config = configlib.load_config(spec)
  (vae if "vae" in spec else ldm).validate_config(config)
