"""Inter-rater agreement: Cohen's kappa, Fleiss' kappa and Krippendorff's alpha.

Pure numpy functions over plain arrays, plus `report`, which applies them to the 1-5 scores in
the rating store for the admin page. Each rater's latest score of a candidate is the one that
counts. Missing data is the rule here (raters rate different subsets), so:
  * Cohen's kappa for a pair of raters uses the candidates both scored;
  * Fleiss' kappa uses candidates scored by at least two raters, with the usual generalisation
    to a varying number of raters per subject (it reduces to Fleiss (1971) when constant);
  * Krippendorff's alpha handles missing values natively (Krippendorff 2011, "Computing
    Krippendorff's alpha-reliability").
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np

LEVELS = ("nominal", "ordinal", "interval")


def cohen_kappa(a: Sequence, b: Sequence, *, weights: str | None = None,
                categories: Sequence | None = None) -> float:
  """Cohen's kappa of two raters' labels of the same items.

  Args:
    a: the first rater's labels.
    b: the second rater's labels (same items, same order).
    weights: None (unweighted), "linear" or "quadratic" (for ordered categories).
    categories: the ordered category list (default: sorted union of the labels).

  Returns:
    kappa; NaN when there are no items or chance agreement is perfect.
  """
  if len(a) != len(b):
    raise ValueError(f"{len(a)} labels against {len(b)}")
  if not len(a):
    return float("nan")
  cats = list(categories) if categories is not None else sorted(set(a) | set(b))
  index = {c: i for i, c in enumerate(cats)}
  k = len(cats)
  observed = np.zeros((k, k))
  for x, y in zip(a, b):
    observed[index[x], index[y]] += 1
  observed /= observed.sum()
  expected = np.outer(observed.sum(1), observed.sum(0))
  i, j = np.indices((k, k))
  if weights is None:
    w = (i != j).astype(float)
  elif weights == "linear":
    w = np.abs(i - j).astype(float)
  elif weights == "quadratic":
    w = (i - j).astype(float)**2
  else:
    raise ValueError(f"weights must be None, 'linear' or 'quadratic', got {weights!r}")
  disagreement = (w * expected).sum()
  return float("nan") if disagreement == 0 else float(1 - (w * observed).sum() / disagreement)


def fleiss_kappa(counts: np.ndarray) -> float:
  """Fleiss' kappa from a subjects x categories table of rating counts.

  Args:
    counts: [N, k] array; counts[i, j] = how many raters put subject i in category j. Subjects
      need at least two ratings; the number may vary between subjects.

  Returns:
    kappa; NaN when there are no subjects or chance agreement is perfect.
  """
  counts = np.asarray(counts, float)
  counts = counts[counts.sum(1) >= 2]
  if not len(counts):
    return float("nan")
  n = counts.sum(1)
  p_subject = ((counts**2).sum(1) - n) / (n * (n - 1))
  p_category = counts.sum(0) / n.sum()
  p_chance = (p_category**2).sum()
  if p_chance == 1:
    return float("nan")
  return float((p_subject.mean() - p_chance) / (1 - p_chance))


def krippendorff_alpha(data: np.ndarray, level: str = "interval") -> float:
  """Krippendorff's alpha of a raters x units table with missing values.

  Args:
    data: [raters, units] numeric array, NaN where a rater did not rate a unit.
    level: "nominal", "ordinal" or "interval" metric.

  Returns:
    alpha; NaN when fewer than two pairable values or no variation at all.
  """
  if level not in LEVELS:
    raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
  data = np.asarray(data, float)
  values = np.unique(data[~np.isnan(data)])
  index = {v: i for i, v in enumerate(values)}
  coincidence = np.zeros((len(values), len(values)))
  for unit in data.T:
    present = unit[~np.isnan(unit)]
    m = len(present)
    if m < 2:
      continue
    for x, y in itertools.permutations(present, 2):
      coincidence[index[x], index[y]] += 1 / (m - 1)
  n_c = coincidence.sum(1)
  n = n_c.sum()
  if n < 2:
    return float("nan")
  i, j = np.indices(coincidence.shape)
  if level == "nominal":
    delta = (i != j).astype(float)
  elif level == "interval":
    delta = (values[i] - values[j])**2
  else:
    # Ordinal distance: the mass of values ranked between c and k, halving the end points.
    cum = np.concatenate([[0.0], np.cumsum(n_c)])
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    delta = (cum[hi + 1] - cum[lo] - (n_c[i] + n_c[j]) / 2)**2
  expected = (np.outer(n_c, n_c) * delta).sum()
  if expected == 0:
    return float("nan")
  return float(1 - (n - 1) * (coincidence * delta).sum() / expected)


def report(scores: Iterable[tuple[str, int, int]]) -> dict:
  """Agreement on 1-5 scores for the admin page.

  Args:
    scores: (rater name, candidate id, score) in rating order; later ones win.

  Returns:
    {"pairs": [{"a", "b", "n", "kappa", "kappa_quadratic"}], "fleiss_kappa", "alpha_ordinal",
     "alpha_interval", "alpha_nominal", "units"} with NaN written as None.
  """
  latest: dict[tuple[str, int], int] = {}
  for rater, cid, score in scores:
    if score is not None:
      latest[(rater, cid)] = score
  raters = sorted({r for r, _ in latest})
  units = sorted({c for _, c in latest})
  table = np.full((len(raters), len(units)), np.nan)
  r_index = {r: i for i, r in enumerate(raters)}
  u_index = {u: i for i, u in enumerate(units)}
  for (r, c), s in latest.items():
    table[r_index[r], u_index[c]] = s
  pairs = []
  for a, b in itertools.combinations(raters, 2):
    both = ~np.isnan(table[r_index[a]]) & ~np.isnan(table[r_index[b]])
    xa, xb = table[r_index[a], both].astype(int), table[r_index[b], both].astype(int)
    pairs.append({"a": a, "b": b, "n": int(both.sum()),
                  "kappa": _none(cohen_kappa(xa, xb, categories=range(1, 6))),
                  "kappa_quadratic": _none(cohen_kappa(xa, xb, weights="quadratic",
                                                       categories=range(1, 6)))})
  counts = np.stack([(table == s).sum(0) for s in range(1, 6)], 1) if units else np.zeros((0, 5))
  return {"pairs": pairs, "fleiss_kappa": _none(fleiss_kappa(counts)),
          "alpha_ordinal": _none(krippendorff_alpha(table, "ordinal")),
          "alpha_interval": _none(krippendorff_alpha(table, "interval")),
          "alpha_nominal": _none(krippendorff_alpha(table, "nominal")),
          "units": int((counts.sum(1) >= 2).sum())}


def _none(x: float) -> float | None:
  return None if np.isnan(x) else round(x, 4)
