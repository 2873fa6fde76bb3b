"""Agreement statistics against published worked examples."""

import numpy as np
import pytest

from fundax.feedback import agreement

# Krippendorff (2011), "Computing Krippendorff's alpha-reliability", section C: 4 coders x 12
# units with missing values; published alphas 0.743 (nominal), 0.815 (ordinal), 0.849 (interval).
_N = np.nan
KRIPPENDORFF_2011 = np.array([
    [1, 2, 3, 3, 2, 1, 4, 1, 2, _N, _N, _N],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, _N, 3],
    [_N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, _N],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, _N],
])
# Fleiss (1971) via Wikipedia's worked example: 10 subjects, 14 raters, 5 categories; 0.210.
FLEISS = np.array([[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0],
                   [2, 2, 8, 1, 1], [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2],
                   [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]])


def test_cohen_kappa_textbook():
  # Wikipedia: 50 items, yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> po 0.7, pe 0.5, kappa 0.4.
  a = ["y"] * 25 + ["n"] * 25
  b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
  assert agreement.cohen_kappa(a, b) == pytest.approx(0.4)
  assert agreement.cohen_kappa([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
  # Hand-worked weighted case: 2 items, (1,1) and (1,3) over categories 1-3.
  # observed quadratic disagreement 0.5*4 = 2; expected: row (1,0,0) x col (.5,0,.5) -> 0.5*4 = 2.
  assert agreement.cohen_kappa([1, 1], [1, 3], weights="quadratic",
                               categories=[1, 2, 3]) == pytest.approx(0.0)
  assert np.isnan(agreement.cohen_kappa([], []))
  with pytest.raises(ValueError):
    agreement.cohen_kappa([1], [1, 2])


def test_fleiss_kappa_textbook():
  assert agreement.fleiss_kappa(FLEISS) == pytest.approx(0.20993, abs=5e-5)
  # Perfect agreement, and subjects with fewer than two ratings are ignored.
  assert agreement.fleiss_kappa([[3, 0], [0, 3], [1, 0]]) == pytest.approx(1.0)


@pytest.mark.parametrize("level,expected", [("nominal", 0.743), ("ordinal", 0.815),
                                            ("interval", 0.849)])
def test_krippendorff_alpha_textbook(level, expected):
  assert agreement.krippendorff_alpha(KRIPPENDORFF_2011, level) == pytest.approx(
      expected, abs=5e-4)


def test_report_uses_latest_scores():
  scores = [("a", 1, 5), ("b", 1, 5), ("a", 2, 1), ("b", 2, 1), ("a", 3, 3), ("b", 3, 3),
            ("a", 1, 1)]  # a changes its mind on candidate 1: the later score counts
  r = agreement.report(scores)
  assert r["units"] == 3
  (pair,) = r["pairs"]
  assert pair["n"] == 3 and pair["kappa"] == pytest.approx(0.5)  # po 2/3, pe 1/3
  assert agreement.report([])["fleiss_kappa"] is None
