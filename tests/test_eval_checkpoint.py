"""`fundax evaluate` end to end: a tiny random LDM checkpoint on disk -> metrics.json + report."""

import dataclasses
import json
import re

import jax
import numpy as np
import pytest

from fundax import cli
from fundax import configlib
from fundax.data import captions
from fundax.data import phantom
from fundax.eval import c2st
from fundax.eval import evaluator as ev
from fundax.eval import run
from fundax.eval import utility
from fundax.models import text_encoder as text_lib
from fundax.selector import score as score_lib

import tiny_ldm

EVALUATOR = {"width": 8, "stage_sizes": (1, 1), "heads": ev.HEADS, "contrast": True,
             "max_pool": True, "resolution": 32}


def _vocab(directory):
  """A 128-entry WordPiece vocabulary (the tiny BERT's size) holding the captions' words."""
  words = set()
  for seed in range(12):
    words.update(re.findall(r"[a-z]+", captions.caption(phantom.generate(seed, 64).labels).lower()))
  tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)][:128]
  tokens += [f"[unused{i}]" for i in range(128 - len(tokens))]
  directory.mkdir()
  (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
  return directory


@pytest.fixture(scope="module")
def ldm_checkpoint(tmp_path_factory):
  """A random tiny LDM saved in the LDM trainer's checkpoint layout (fundax/trainers/ldm.py)."""
  root = tmp_path_factory.mktemp("ldm")
  vocab = _vocab(root / "vocab")
  models = dataclasses.replace(tiny_ldm.tiny_models(),
                               special_tokens=text_lib.special_tokens(vocab))
  return tiny_ldm.save_checkpoint(
      root / "run", models, tiny_ldm.init_params(models), tokenizer_dir=str(vocab),
      job=configlib.load_config("configs/ldm.py:tiny").to_dict())


@pytest.fixture(scope="module")
def evaluator_dir(tmp_path_factory):
  # Untrained: the glue is under test here, not the evaluator's accuracy.
  directory = tmp_path_factory.mktemp("ev") / "evaluator"
  model = ev.make_model(EVALUATOR)
  ev.save_evaluator(directory, ev.init_params(model, jax.random.key(0), 32), EVALUATOR)
  return str(directory)


def test_evaluate_command_on_a_checkpoint(ldm_checkpoint, evaluator_dir, tmp_path, capsys,
                                          monkeypatch):
  prompts = ["right eye, macula-centred, moderate diabetic retinopathy",
             "left eye, macula-centred, no diabetic retinopathy"]
  (tmp_path / "prompts.txt").write_text("\n".join([prompts[0], "", *prompts, ""]))
  scored = []

  def fake_score_images(selector_dir, paths, prompts):
    # The real scorer is tested in test_selector_train.py; here: what evaluate hands it.
    scored.append((selector_dir, list(paths), list(prompts)))
    return [{"score": i / 10, "accepted": i > 0} for i in range(len(paths))]
  monkeypatch.setattr(score_lib, "score_images", fake_score_images)
  # A few steps of a narrow TSTR classifier: its learning is tested in test_eval_utility.py.
  monkeypatch.setattr(utility, "DEFAULTS", {**utility.DEFAULTS, "width": 8,
                                            "stage_sizes": (1,), "steps": 3, "batch_size": 4})
  monkeypatch.setattr(c2st, "DEFAULTS", {**c2st.DEFAULTS, "width": 8,
                                         "stage_sizes": (1,), "steps": 3, "batch_size": 4})
  out, selector = tmp_path / "out", tmp_path / "selector"
  selector.mkdir()  # the stub scores; the command checks the directory exists before any work
  assert cli.main(["evaluate", "--checkpoint", ldm_checkpoint, "--evaluator", evaluator_dir,
                   "--selector", str(selector), "--prompts", str(tmp_path / "prompts.txt"),
                   "--out", str(out), "--samples-per-prompt", "2", "--num-steps", "2",
                   "--num-reference", "6", "--num-heldout", "4"]) == 0
  printed = capsys.readouterr().out
  assert "Fréchet distance" in printed and f"report: {out / 'report.html'}" in printed

  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["num_images"] == 4 and metrics["num_reference"] == 6
  samples = sorted(out.glob("samples/*.png"))
  assert len(samples) == 4
  # Two samples per prompt, in prompt order, handed to the Selector with their prompts.
  assert scored == [(str(selector), [str(p) for p in samples],
                     [prompts[0]] * 2 + [prompts[1]] * 2)]
  assert metrics["selector"]["scores"] == pytest.approx([0.0, 0.1, 0.2, 0.3])
  assert set(metrics["diversity_by_prompt"]) == set(prompts)
  assert metrics["consistency"]["dr_grade"]["n"] == 4
  assert np.sum(metrics["consistency"]["laterality"]["confusion"]) == 4
  assert set(metrics["utility"]) == {"synthetic", "synthetic+real", "real", "shuffled labels"}
  assert metrics["utility"]["synthetic"]["n"] == 4
  assert len(metrics["privacy"]["pixel_rms"]) == 4
  assert all(np.isfinite(metrics["fidelity"][k]) for k in ("frechet_distance", "kid"))
  # Every table row carries its floor (phantoms) and negative control beside the value.
  assert all({"generated", "phantoms", "control"} <= set(row) for row in metrics["table"])
  html = (out / "report.html").read_text()
  assert "SYNTHETIC IMAGES" in html and "Selector score" in html
  assert all(s.startswith("data:image/png;base64,") for s in re.findall(r'src="([^"]*)"', html))


def test_evaluate_command_calls_evaluate_checkpoint(tmp_path, monkeypatch, capsys):
  # The main job's report calls the same function (tests/test_main_job.py).
  calls = []

  def evaluate_checkpoint(checkpoint_dir, out_dir, **kwargs):
    calls.append((checkpoint_dir, out_dir, kwargs))
    return {"table": [], "metrics_json": f"{out_dir}/metrics.json",
            "report": f"{out_dir}/report.html"}
  monkeypatch.setattr(run, "evaluate_checkpoint", evaluate_checkpoint)
  (tmp_path / "ckpt").mkdir()
  assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--out",
                   str(tmp_path / "out"), "--num-steps", "3"]) == 0
  [(checkpoint_dir, out_dir, kwargs)] = calls
  assert (checkpoint_dir, out_dir) == (str(tmp_path / "ckpt"), str(tmp_path / "out"))
  assert kwargs["data"] == run.PHANTOM and kwargs["config"]["num_steps"] == 3
  assert f"report: {tmp_path / 'out' / 'report.html'}" in capsys.readouterr().out


def test_evaluate_checkpoint_on_data_from_a_loader(ldm_checkpoint, tmp_path, monkeypatch):
  # The main job's report passes its dataset as a loader: the glue around `evaluate` (stubbed;
  # it is tested in test_eval_report.py and above) with the prompts, images and labels it gives.
  cases = [phantom.generate(seed, 64) for seed in (1, 1, 2, 3, 4)]  # seed 1 twice: one prompt
  loaded = []

  def load(split, num):
    loaded.append((split, num))
    chosen = cases[:num]
    return np.stack([c.image for c in chosen]), [c.labels for c in chosen]
  monkeypatch.setattr(run, "generate_from_checkpoint", lambda pipeline, prompts, config: (
      np.zeros((len(prompts) * 2, 64, 64, 3), np.float32), [p for p in prompts for _ in "ab"]))
  monkeypatch.setattr(score_lib, "score_images", lambda d, paths, prompts: [
      {"score": 0.5, "accepted": i % 4 == 0} for i in range(len(paths))])
  evaluated = []
  monkeypatch.setattr(run, "evaluate", lambda images, prompts, **kw: evaluated.append(
      (images, prompts, kw)) or {"table": []})
  (tmp_path / "selector").mkdir()
  out = run.evaluate_checkpoint(ldm_checkpoint, str(tmp_path / "out"), evaluator_dir=str(tmp_path),
                                selector_dir=str(tmp_path / "selector"), data=load,
                                num_prompts=3, num_reference=2, num_heldout=4,
                                note="the main job's data", sections=["<h2>RLHF</h2>"])
  assert loaded == [("train", 2), ("test", 4)]
  [(images, prompts, kw)] = evaluated
  distinct = [captions.caption(c.labels) for c in cases[1:4]]  # the first 3 distinct captions
  assert prompts == [p for p in distinct for _ in "ab"] and len(images) == 6
  assert len(kw["reference_images"]) == 2 and len(kw["heldout_labels"]) == 4
  assert kw["selector_scores"] == [0.5] * 6 and out["accepted_by_selector"] == pytest.approx(2 / 6)
  assert kw["sections"] == ["<h2>RLHF</h2>"]
  assert kw["note"].endswith("against 2 reference images; TSTR tested on 4 held-out images. "
                             "the main job's data")
  assert len(out["samples"]) == 6 and all(p.startswith(str(tmp_path / "out" / run.SAMPLES_DIR))
                                          for p in out["samples"])


def test_privacy_reference_is_the_phantom_training_split():
  # The LDM's phantom training images are reproduced from their seeds, not drawn anew.
  images, labels = run.phantom_data("train", 2, 64)
  first = phantom.generate(0, 64)
  np.testing.assert_array_equal(images[0], first.image)
  assert labels[0] == first.labels


def test_evaluate_checkpoint_rejects_bad_sizes_before_generating(tmp_path):
  with pytest.raises(ValueError, match="num_reference"):
    run.evaluate_checkpoint(str(tmp_path), str(tmp_path / "out"), num_reference=0)
  with pytest.raises(ValueError, match="empty prompt list"):
    run.evaluate_checkpoint(str(tmp_path), str(tmp_path / "out"), prompts=[])
  with pytest.raises(ValueError, match="holds no prompts"):
    (tmp_path / "p.txt").write_text("\n\n")
    run.read_prompts(str(tmp_path / "p.txt"))
