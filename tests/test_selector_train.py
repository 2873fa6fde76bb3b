"""The Selector end to end: the tiny config learns, writes its report, scores from disk, and
resumes after an interruption or a SIGTERM with the run an uninterrupted one gives."""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from PIL import Image

from fundax import checkpoint
from fundax import configlib
from fundax.data import phantom
from fundax.selector import data as data_lib
from fundax.selector import score as score_lib
from fundax.selector import train as train_lib


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  config = configlib.load_config("configs/selector.py:tiny")
  # Smaller than the tiny demo so the whole file stays well under a minute of compute.
  configlib.apply_overrides(config, [
      "ratings.num_synthetic=64",
      "num_steps=200", "checkpoint_every=100", "log_every=50"])
  workdir = str(tmp_path_factory.mktemp("selector"))
  return config, workdir, train_lib.train_selector(config, workdir)


def test_tiny_trainer_learns_good_vs_reject(run):
  config, workdir, out = run
  report = out["report"]
  graded = report["heldout"]["graded"]
  # Phantom reject images carry strong defects: held-out good-vs-reject must be clearly learnt.
  assert graded["auroc"] > 0.8, graded
  assert report["threshold_source"] == "ratings"
  t = report["threshold"]
  assert 0.0 <= t["threshold"] <= 1.0 and 0.0 <= t["recall"] <= 1.0
  assert t["precision"] >= config.target_precision or not t["reached"]
  for key in ("auroc", "auprc", "ece", "calibration", "criteria_auroc"):
    assert key in graded and key in report["heldout"]["ratings"]
  on_disk = json.load(open(os.path.join(workdir, score_lib.EVAL_FILE)))
  assert on_disk["threshold"] == t
  for path in report["plots"]:
    assert os.path.getsize(path) > 1000
  lines = [json.loads(l) for l in open(out["metrics"])]
  assert [l["step"] for l in lines] == [50, 100, 150, 200]
  assert all(np.isfinite(l["loss"]) for l in lines)


def test_score_images_from_checkpoint(run, tmp_path):
  _, workdir, out = run
  paths, prompts = [], []
  for i, quality in enumerate(("good", "reject", "good")):
    sample = phantom.generate(900_000 + i, 64, quality=quality)
    path = str(tmp_path / f"{quality}_{i}.png")
    Image.fromarray(sample.image).save(path)
    paths.append(path)
    prompts.append("Colour fundus photograph of the left eye." if i else None)
  results = score_lib.score_images(workdir, paths, prompts)
  threshold = out["report"]["threshold"]["threshold"]
  assert [r["path"] for r in results] == paths
  for r in results:
    assert 0.0 <= r["score"] <= 1.0
    assert r["accepted"] == (r["score"] >= threshold) and r["threshold"] == threshold
  assert results[0]["criteria"]["prompt_match"] is None
  assert 0.0 <= results[1]["criteria"]["prompt_match"] <= 1.0
  assert set(results[1]["criteria"]) == {"optic_disc_clarity", "vessel_structure",
                                         "contrast_illumination", "artifacts", "prompt_match"}
  # Deterministic, and an explicit threshold overrides the learned one.
  again = score_lib.score_images(workdir, paths[:1], threshold=1.01)
  assert again[0]["score"] == pytest.approx(results[0]["score"], abs=1e-6)
  assert again[0]["accepted"] is False


def metric_rows(outputs):
  """metrics.jsonl without its wall-clock times."""
  return [{k: v for k, v in json.loads(line).items() if k != "time"}
          for line in open(outputs["metrics"])]


def test_resume_and_sigterm_replay_the_same_run(run, tmp_path, monkeypatch):
  """An interruption after the step-100 checkpoint (the last checkpoint and the report lost),
  a rerun SIGTERMed at step 131, and a second rerun: the uninterrupted run's params, threshold
  and metrics, with no repeated metric lines."""
  config, workdir, out = run
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", str(config.num_steps)))
  os.remove(os.path.join(resumed, score_lib.EVAL_FILE))
  sample_batch = data_lib.sample_batch

  def sigterm_at_130(examples, seed, step, *args):
    if step == 130:  # the batch of step 131: that step finishes, is saved, and the run stops
      os.kill(os.getpid(), signal.SIGTERM)
    return sample_batch(examples, seed, step, *args)

  monkeypatch.setattr(data_lib, "sample_batch", sigterm_at_130)
  stopped = train_lib.train_selector(config, resumed)
  assert stopped["preempted"] == "SIGTERM" and "at step 131 of 200" in stopped["unfinished"]
  assert "report" not in stopped and not os.path.exists(os.path.join(resumed,
                                                                     score_lib.EVAL_FILE))
  assert checkpoint.restore_params(resumed)["step"] == 131
  monkeypatch.setattr(data_lib, "sample_batch", sample_batch)
  again = train_lib.train_selector(config, resumed)
  assert "unfinished" not in again
  jax.tree.map(np.testing.assert_array_equal,
               checkpoint.restore_params(resumed)["state"]["params"],
               checkpoint.restore_params(workdir)["state"]["params"])
  assert again["report"]["threshold"] == out["report"]["threshold"]
  assert metric_rows(again) == metric_rows(out)
