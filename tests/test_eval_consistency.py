"""Kappa, AUROC and prompt/evaluator agreement against hand-worked and sklearn answers."""

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from fundax.data import captions
from fundax.data import labels as labels_lib
from fundax.eval import consistency


def test_qwk_hand_example():
  # O has ones at (0,0), (1,2), (2,2): sum W*O = 1/4. Marginals true [1,1,1], pred [1,0,2]:
  # sum W*E = 2/3 + 1/4 + 1/3 = 5/4. kappa = 1 - (1/4) / (5/4) = 0.8.
  assert consistency.quadratic_weighted_kappa([0, 1, 2], [0, 2, 2], 3) == pytest.approx(0.8)


def test_qwk_matches_sklearn_and_extremes():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 5, 200)
  p = np.clip(y + rng.integers(-1, 2, 200), 0, 4)
  assert consistency.quadratic_weighted_kappa(y, p, 5) == pytest.approx(
      cohen_kappa_score(y, p, weights="quadratic"), abs=1e-12)
  assert consistency.quadratic_weighted_kappa(y, y, 5) == pytest.approx(1.0)
  assert consistency.quadratic_weighted_kappa([0, 4], [4, 0], 5) == pytest.approx(-1.0)


def test_auroc_hand_cases_and_ties():
  assert consistency.auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
  assert consistency.auroc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts one half
  # Pairs (pos, neg): 0.8>0.1, 0.8>0.4, 0.35>0.1, 0.35<0.4 -> 3/4.
  assert consistency.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
  assert np.isnan(consistency.auroc([1, 1], [0.1, 0.2]))
  rng = np.random.default_rng(1)
  y, s = rng.integers(0, 2, 300), rng.integers(0, 5, 300)  # many ties
  assert consistency.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_confusion_matrix_counts():
  m = consistency.confusion_matrix([0, 0, 1, 2], [0, 1, 1, 0], 3)
  np.testing.assert_array_equal(m, [[1, 1, 0], [0, 1, 0], [1, 0, 0]])


def test_consistency_scores_only_stated_attributes():
  asked = [labels_lib.FundusLabels(laterality="right", dr_grade=2, cdr=0.3),
           labels_lib.FundusLabels(laterality="left", dr_grade=4, cdr=0.7),
           labels_lib.FundusLabels(laterality="left")]
  prompts = [captions.caption(l) for l in asked]
  predictions = {"laterality": np.array([0, 0, 1]), "dr_grade": np.array([2, 3, 0]),
                 "cdr": np.array([0.35, 0.5, 0.2]), "amd_stage": np.array([0, 0, 0])}
  out = consistency.consistency(prompts, predictions)
  assert out["laterality"]["accuracy"] == pytest.approx(2 / 3)
  assert out["dr_grade"]["n"] == 2 and out["dr_grade"]["accuracy"] == 0.5
  assert out["dr_grade"]["confusion"][4][3] == 1 and out["dr_grade"]["confusion"][2][2] == 1
  assert out["cdr"]["n"] == 2 and out["cdr"]["mae"] == pytest.approx(0.125, abs=0.011)
  assert "amd_stage" not in out  # no prompt states an AMD stage
  # Prompt 0 agrees on everything stated; prompt 1 misses grade, laterality and CDR; prompt 2
  # states only laterality, which agrees.
  assert out["per_image_agree"] == [True, False, True]
  assert out["all_stated_agree"] == pytest.approx(2 / 3)
  assert out["stated_agree_fraction"] == pytest.approx((3 / 3 + 0 / 3 + 1 / 1) / 3)
  assert out["per_image_fraction"] == pytest.approx([1.0, 0.0, 1.0])
  assert np.isnan(consistency.consistency([""], {"laterality": np.array([0])})
                  ["per_image_fraction"][0])  # a prompt stating nothing has no fraction
  # Prompt 1 now gets its eye right: partial credit moves, all-or-nothing does not.
  out = consistency.consistency(prompts, {**predictions, "laterality": np.array([0, 1, 1])})
  assert out["all_stated_agree"] == pytest.approx(2 / 3)
  assert out["stated_agree_fraction"] == pytest.approx((3 / 3 + 1 / 3 + 1 / 1) / 3)
