"""TSTR scores: hand-worked grade scores, and a classifier that learns a planted grade signal."""

import numpy as np

from fundax.eval import utility


def test_grade_scores_hand_case():
  y = np.array([0, 1, 2, 4])
  probs = np.eye(5)[[0, 1, 2, 3]]  # one miss: grade 4 predicted as 3
  out = utility.grade_scores(y, probs)
  assert out["accuracy"] == 0.75 and out["n"] == 4
  # Referable scores (P(grade >= 2)): [0, 0, 1, 1] for truth [F, F, T, T] -> AUROC 1.
  assert out["referable_auroc"] == 1.0
  assert 0.9 < out["qwk"] < 1.0


def _graded_images(rng, n):
  """16 px images whose brightness encodes the grade: a signal any classifier can learn."""
  grades = rng.integers(0, 5, n)
  images = (grades[:, None, None, None] / 2.0 - 1.0
            + 0.1 * rng.normal(size=(n, 16, 16, 3))).astype(np.float32)
  return images, grades


def test_tstr_learns_a_planted_signal_with_both_arms():
  rng = np.random.default_rng(0)
  synth, synth_g = _graded_images(rng, 64)
  real, real_g = _graded_images(rng, 16)
  test, test_g = _graded_images(rng, 40)
  config = {"width": 8, "stage_sizes": (1,), "steps": 60, "batch_size": 16, "lr": 1e-2}
  out = utility.tstr(synth, synth_g, test, test_g, real_images=real, real_grades=real_g,
                     config=config)
  assert set(out) == {"synthetic", "synthetic+real"}
  for scores in out.values():
    assert scores["n"] == 40
    assert scores["qwk"] > 0.8 and scores["referable_auroc"] > 0.9


def test_tstr_with_shuffled_labels_is_near_chance():
  rng = np.random.default_rng(1)
  synth, synth_g = _graded_images(rng, 64)
  test, test_g = _graded_images(rng, 40)
  config = {"width": 8, "stage_sizes": (1,), "steps": 60, "batch_size": 16, "lr": 1e-2}
  out = utility.tstr(synth, rng.permutation(synth_g), test, test_g, config=config)
  assert out["synthetic"]["qwk"] < 0.5
