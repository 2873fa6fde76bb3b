"""Text-image consistency: does the image show what its prompt asked for?

The prompt is parsed back into labels (`captions.parse_caption`) and compared, attribute by
attribute, with what the independent evaluator predicts from the image. Only attributes the
prompt states are scored (a prompt that says nothing about AMD asks for nothing). Also home of
the ordinal-agreement statistics used across fundax/eval: confusion matrices, quadratic
weighted kappa (Cohen 1968) and a tie-aware AUROC.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

from fundax.data import captions
from fundax.data import labels as labels_lib

# Attribute -> number of classes, for the categorical attributes scored with a confusion matrix.
CLASSES = {"dr_grade": 5, "dme": 2, "amd_stage": 4, "hypertensive_grade": 5, "quality": 3,
           "laterality": 2, "field": 2, "glaucoma": 2}
ORDINAL = ("dr_grade", "amd_stage", "hypertensive_grade", "quality")
REFERABLE_DR_GRADE = 2  # ICDR moderate NPDR or worse is referable
CDR_TOLERANCE = 0.1  # a predicted cup-to-disc ratio within this of the prompt's counts as agreeing


def label_code(name: str, labels: labels_lib.FundusLabels):
  """The integer class of a categorical attribute (float for "cdr"), or None when unknown."""
  value = getattr(labels, name)
  if value is None:
    return None
  if name == "laterality":
    return labels_lib.LATERALITIES.index(value)
  if name == "field":
    return labels_lib.FIELDS.index(value)
  if name == "quality":
    return labels_lib.QUALITIES.index(value)
  if name == "cdr":
    return float(value)
  return int(value)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
  """Counts [K, K]: rows are the true (asked-for) class, columns the predicted one."""
  m = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(m, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
  return m


def quadratic_weighted_kappa(y_true, y_pred, num_classes: int) -> float:
  """Cohen's weighted kappa with quadratic weights (Cohen 1968).

  kappa = 1 - sum(W * O) / sum(W * E), with O the observed confusion matrix, E the outer
  product of the marginals divided by N (chance agreement) and W_ij = (i - j)^2 / (K - 1)^2.

  Args:
    y_true: [N] ints in [0, K).
    y_pred: [N] ints in [0, K).
    num_classes: K.

  Returns:
    kappa in [-1, 1]; 1.0 when both raters use a single identical class (no disagreement and
    no chance disagreement).
  """
  o = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
  e = np.outer(o.sum(1), o.sum(0)) / max(o.sum(), 1.0)
  i, j = np.indices(o.shape)
  w = (i - j) ** 2 / max(num_classes - 1, 1) ** 2
  denom = (w * e).sum()
  return 1.0 if denom == 0 else float(1.0 - (w * o).sum() / denom)


def auroc(y_true, scores) -> float:
  """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2.

  Computed from average ranks (Mann-Whitney U), so tied scores are handled exactly.

  Args:
    y_true: [N] booleans (positive class True).
    scores: [N] floats, higher = more positive.

  Returns:
    The AUROC, or NaN when only one class is present.
  """
  y = np.asarray(y_true, bool)
  s = np.asarray(scores, np.float64)
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if not n_pos or not n_neg:
    return float("nan")
  order = np.argsort(s, kind="mergesort")
  ranks = np.empty(len(s))
  sorted_s = s[order]
  # Average rank within each run of tied scores.
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
  ends = np.r_[starts[1:], len(s)]
  for a, b in zip(starts, ends):
    ranks[order[a:b]] = (a + b + 1) / 2.0
  u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def agreement(y_true, y_pred, num_classes: int, ordinal: bool) -> dict:
  """Accuracy, confusion matrix and (for ordinal attributes) quadratic weighted kappa."""
  y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
  out = {"n": int(len(y_true)), "accuracy": float((y_true == y_pred).mean()),
         "confusion": confusion_matrix(y_true, y_pred, num_classes).tolist()}
  if ordinal:
    out["qwk"] = quadratic_weighted_kappa(y_true, y_pred, num_classes)
  return out


def consistency(prompts: Sequence[str], predictions: Mapping[str, np.ndarray],
                scored: Collection[str] | None = None) -> dict:
  """Per-attribute agreement between what the prompts ask for and what the evaluator sees.

  Args:
    prompts: N prompt strings.
    predictions: attribute -> [N] predicted codes (as `evaluator.predict` returns: class
      indices for categorical attributes, floats for "cdr").
    scored: the attributes that count in the per-image and overall agreement (those the
      evaluator reads reliably at this resolution, `Evaluator.readable`); the others are
      still measured and reported, marked "scored": False. None: all.

  Returns:
    attribute -> {"n", "accuracy", "confusion" [K][K], "qwk" (ordinal only), "scored"}, and for
    "cdr" {"n", "mae", "accuracy" (within CDR_TOLERANCE), "scored"}; attributes no prompt
    states are absent. "per_image_agree" [N] says whether each image agrees on every scored
    attribute its prompt states, and "all_stated_agree" is its mean; "per_image_fraction" [N]
    is the fraction of each image's stated, scored attributes confirmed (NaN where its prompt
    states none), and "stated_agree_fraction" its mean over the images with a statement
    (partial credit: it still moves when few images get every attribute right).
  """
  asked = [captions.parse_caption(p) for p in prompts]
  report = {}
  all_ok = np.ones(len(prompts), bool)
  stated, confirmed = np.zeros(len(prompts)), np.zeros(len(prompts))
  for name in (*CLASSES, "cdr"):
    if name not in predictions:
      continue
    codes = [label_code(name, a) for a in asked]
    idx = np.array([i for i, c in enumerate(codes) if c is not None], int)
    if not len(idx):
      continue
    want = np.array([codes[i] for i in idx])
    got = np.asarray(predictions[name])[idx]
    if name == "cdr":
      ok = np.abs(got - want) <= CDR_TOLERANCE
      report[name] = {"n": int(len(idx)), "mae": float(np.abs(got - want).mean()),
                      "accuracy": float(ok.mean())}
    else:
      ok = got == want
      report[name] = agreement(want, got, CLASSES[name], name in ORDINAL)
    report[name]["scored"] = scored is None or name in scored
    if not report[name]["scored"]:
      continue
    all_ok[idx] &= ok
    stated[idx] += 1
    confirmed[idx] += ok
  report["all_stated_agree"] = float(all_ok.mean()) if len(prompts) else float("nan")
  some = stated > 0
  fraction = np.where(some, confirmed / np.maximum(stated, 1), np.nan)
  report["per_image_fraction"] = fraction.tolist()
  report["stated_agree_fraction"] = float(fraction[some].mean()) if some.any() else float("nan")
  report["per_image_agree"] = all_ok.tolist()
  return report
