"""Between rounds: the stand-in truth of generated candidates, the rating store round trip and
the Selector retraining config."""

import json

import numpy as np
import pytest

from fundax import checkpoint
from fundax import configlib
from fundax.data import phantom
from fundax.feedback import store as store_lib
from fundax.rl import feedback


@pytest.fixture(scope="module")
def phantoms():
  good = [phantom.generate(seed=1000 + s, resolution=64, quality="good") for s in range(4)]
  return good


def test_stand_in_truth_on_phantom_and_broken_images(phantoms):
  for sample in phantoms:
    assert feedback.quality_defects(sample.image) == ()
  prompt = "Colour fundus photograph of the left eye, macula-centred. No diabetic retinopathy."
  black = np.full((64, 64, 3), -1.0, np.float32)
  labels = feedback.stand_in_labels(black, prompt)
  assert labels["quality"] == "reject"
  assert {"off_centre", "underexposure", "defocus"} <= set(labels["quality_defects"])
  assert labels["dr_grade"] == 0  # the prompt's stated facts are kept
  # The laterality is where the disc is seen: a mirrored eye contradicts its prompt.
  sample = phantoms[0]
  side = sample.labels.laterality
  other = "left" if side == "right" else "right"
  mirrored = sample.image[:, ::-1]
  prompt = f"Colour fundus photograph of the {side} eye, macula-centred."
  if sample.labels.field == "macula-centred":
    assert feedback.stand_in_labels(sample.image, prompt)["laterality"] == side
    assert feedback.stand_in_labels(mirrored, prompt)["laterality"] == other


def test_push_candidates_rates_and_exports(phantoms, tmp_path):
  images = np.stack([s.image for s in phantoms]).astype(np.float32) / 127.5 - 1.0
  prompts = ["left eye, no DR"] * 2 + ["right eye, mild NPDR"] * 2
  db = str(tmp_path / "feedback" / "ratings.sqlite")
  (tmp_path / "feedback").mkdir()
  counts = feedback.push_candidates(tmp_path / "feedback" / "round_000", db, images, prompts,
                                    seeds=[0] * 4, model_step=3, media=tmp_path / "feedback",
                                    simulated=True, rater_seed=0)
  assert counts["candidates"] == 4 and counts["ratings"] >= 8 and counts["pairs"] > 0
  again = feedback.push_candidates(tmp_path / "feedback" / "round_000", db, images, prompts,
                                   seeds=[0] * 4, model_step=3, media=tmp_path / "feedback",
                                   simulated=True, rater_seed=0)
  assert again == {"candidates": 0, "ratings": 0, "pairs": 0}  # a resumed round adds nothing
  store = store_lib.as_store(db)
  assert {c["model_step"] for c in store.candidates()} == {3}
  manifest = (tmp_path / "feedback" / "round_000" / "candidates.jsonl").read_text().splitlines()
  assert json.loads(manifest[0])["labels"]["quality"] in ("good", "usable", "reject")


def test_selector_retrain_config(tmp_path):
  job = configlib.load_config("configs/selector.py:tiny")
  manager = checkpoint.make_manager(tmp_path)
  checkpoint.save(manager, 1, {"x": np.zeros(2)}, config={"job": job.to_dict()}, extras={})
  manager.close()
  overrides = configlib.load_config("configs/rlhf.py:tiny").feedback.selector
  config = feedback.selector_retrain_config(str(tmp_path), "/r/ratings.jsonl", overrides)
  assert config.ratings.train_path == "/r/ratings.jsonl" and config.ratings.num_synthetic == 0
  assert config.num_steps == config.optim.total_steps == overrides.num_steps
  assert config.optim.warmup_steps < config.num_steps
  assert config.graded.num_train == overrides.graded_train
  # The same architecture (JSON keeps tuples as lists).
  assert config.model.to_dict() == json.loads(json.dumps(job.model.to_dict()))


def test_heldout_evaluator_metrics(phantoms, tmp_path):
  """The guard's judge on a random evaluator: every metric is computed and in range."""
  from fundax.eval import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
  from fundax.rl import guard  # pylint: disable=g-import-not-at-top
  model_config = {"width": 8, "stage_sizes": [1, 1], "heads": dict(evaluator_lib.HEADS),
                  "contrast": False, "max_pool": False, "resolution": 32}
  model = evaluator_lib.make_model(model_config)
  params = evaluator_lib.init_params(model, __import__("jax").random.key(0), 32)
  evaluator_lib.save_evaluator(tmp_path / "ev", params, model_config)
  images = np.stack([s.image[::2, ::2] for s in phantoms]).astype(np.float32) / 127.5 - 1.0
  judge = guard.HeldoutEvaluator(evaluator_lib.load_evaluator(tmp_path / "ev"),
                                 reference_images=images[:2], training_images=images[2:])
  prompts = ["left eye, no DR"] * 2 + ["right eye, mild NPDR"] * 2
  metrics = judge(images, prompts)
  assert set(metrics) == set(guard.DIRECTIONS)
  assert 0 <= metrics["quality"] <= 1 and 0 <= metrics["consistency"] <= 1
  assert metrics["domain_fd"] >= 0 and 0 <= metrics["diversity"] <= 1
  assert metrics["privacy"] == 0.5  # two of the images are the "training" images themselves
