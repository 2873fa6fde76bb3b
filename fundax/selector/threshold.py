"""The acceptance threshold and the Selector's held-out report: ROC, PR, calibration, plots.

Pure numpy on host arrays of scores (probabilities in [0, 1]) and binary labels (1 = the rater
accepted the image). An image is accepted when `score >= threshold`.

`choose_threshold` picks the *lowest* threshold whose precision on the held-out labels reaches
`target_precision`, i.e. the one that keeps the most images (highest recall) among those precise
enough. Rules at the edges:
  * candidate thresholds are the distinct scores, so tied scores are always accepted or
    rejected together (a tie cannot be split to hit the target exactly);
  * precision is not monotone in the threshold; every candidate is checked, not just the first
    crossing from above;
  * an unreachable target (no candidate is precise enough, including when there are no
    positives) gives the highest candidate, i.e. accept only the top-scoring group, with a
    WARNING and `reached=False`;
  * no examples at all is an error.

AUROC is the area under the ROC curve by the trapezoid rule over distinct thresholds (ties
count one half, as in the Mann-Whitney statistic). AUPRC is average precision,
`sum_n (R_n - R_{n-1}) P_n` over distinct thresholds (scikit-learn's definition, no
interpolation). ECE uses equal-width bins on [0, 1] (the last bin includes 1.0):
`sum_b (n_b / N) |mean(label)_b - mean(score)_b|`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ThresholdChoice:
  """The chosen threshold and what it does on the held-out labels."""
  threshold: float
  precision: float
  recall: float
  num_accepted: int
  target_precision: float
  reached: bool  # False: the target was unreachable; the highest candidate was taken


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(scores, np.float64).ravel()
  labels = np.asarray(labels).ravel()
  if scores.shape != labels.shape:
    raise ValueError(f"scores and labels differ in size: {scores.shape} vs {labels.shape}")
  if scores.size == 0:
    raise ValueError("no held-out examples to evaluate")
  if not np.isin(labels, (0, 1)).all():
    raise ValueError("labels must be 0 or 1")
  return scores, labels.astype(np.float64)


def _counts(scores: np.ndarray, labels: np.ndarray):
  """Distinct thresholds (descending) with true/false positives accepted at each."""
  order = np.argsort(-scores, kind="stable")
  s, y = scores[order], labels[order]
  last_of_group = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
  tp = np.cumsum(y)[last_of_group]
  fp = np.cumsum(1.0 - y)[last_of_group]
  return s[last_of_group], tp, fp


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """False- and true-positive rates at each distinct threshold.

  Args:
    scores: `[N]` scores.
    labels: `[N]` 0/1.

  Returns:
    `(fpr, tpr, thresholds)`, starting at (0, 0) with threshold +inf; NaN rates when a class
    is absent.
  """
  scores, labels = _check(scores, labels)
  thr, tp, fp = _counts(scores, labels)
  pos, neg = labels.sum(), labels.size - labels.sum()
  with np.errstate(invalid="ignore", divide="ignore"):
    tpr = np.r_[0.0, tp] / pos
    fpr = np.r_[0.0, fp] / neg
  return fpr, tpr, np.r_[np.inf, thr]


def roc_auc(scores, labels) -> float:
  """Area under the ROC curve (trapezoids; ties count 1/2); NaN when a class is absent."""
  fpr, tpr, _ = roc_curve(scores, labels)
  if np.isnan(fpr).any() or np.isnan(tpr).any():
    return float("nan")
  return float(np.trapezoid(tpr, fpr))


def pr_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Precision and recall at each distinct threshold (descending thresholds).

  Args:
    scores: `[N]` scores.
    labels: `[N]` 0/1.

  Returns:
    `(precision, recall, thresholds)`; recall is NaN when there are no positives.
  """
  scores, labels = _check(scores, labels)
  thr, tp, fp = _counts(scores, labels)
  with np.errstate(invalid="ignore", divide="ignore"):
    recall = tp / labels.sum()
  return tp / (tp + fp), recall, thr


def average_precision(scores, labels) -> float:
  """AUPRC as average precision `sum (R_n - R_{n-1}) P_n`; NaN without positives."""
  precision, recall, _ = pr_curve(scores, labels)
  if np.isnan(recall).any():
    return float("nan")
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def expected_calibration_error(scores, labels, num_bins: int = 15) -> tuple[float, dict]:
  """ECE over equal-width bins, and the per-bin table the reliability diagram draws.

  Args:
    scores: `[N]` probabilities in [0, 1].
    labels: `[N]` 0/1.
    num_bins: number of bins on [0, 1].

  Returns:
    `(ece, bins)`: bins holds "count", "mean_score", "accept_rate" (NaN for empty bins) and
    "edges" (num_bins + 1), as lists.
  """
  scores, labels = _check(scores, labels)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  idx = np.clip(np.digitize(scores, edges[1:-1], right=False), 0, num_bins - 1)
  count = np.bincount(idx, minlength=num_bins).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_score = np.bincount(idx, scores, num_bins) / count
    rate = np.bincount(idx, labels, num_bins) / count
  gap = np.where(count > 0, np.abs(rate - mean_score), 0.0)
  ece = float(np.sum(count / scores.size * gap))
  return ece, {"count": count.tolist(), "mean_score": mean_score.tolist(),
               "accept_rate": rate.tolist(), "edges": edges.tolist()}


def choose_threshold(scores, labels, target_precision: float) -> ThresholdChoice:
  """The lowest threshold whose held-out precision reaches the target (edge rules above).

  Args:
    scores: `[N]` held-out scores.
    labels: `[N]` held-out accept labels, 0/1.
    target_precision: required precision of the accepted images, in (0, 1].

  Returns:
    The ThresholdChoice.
  """
  if not 0.0 < target_precision <= 1.0:
    raise ValueError(f"target_precision must be in (0, 1], got {target_precision}")
  precision, recall, thr = pr_curve(scores, labels)
  ok = np.flatnonzero(precision >= target_precision)
  if ok.size:
    i = int(ok[-1])  # thresholds descend: the last precise-enough one is the lowest
    reached = True
  else:
    i = 0
    reached = False
    log.warning("target precision %.3f is unreachable on %d held-out labels (best %.3f); "
                "using the highest threshold %.4f", target_precision, np.size(labels),
                float(np.nanmax(precision)), float(thr[0]))
  accepted = int(np.sum(np.asarray(scores) >= thr[i]))
  return ThresholdChoice(threshold=float(thr[i]), precision=float(precision[i]),
                         recall=float(np.nan_to_num(recall[i])), num_accepted=accepted,
                         target_precision=float(target_precision), reached=reached)


def evaluate(scores, labels, target_precision: float, num_bins: int = 15) -> dict[str, Any]:
  """AUROC, AUPRC, ECE, the chosen threshold and the curves, as one JSON-able dict.

  Args:
    scores: `[N]` held-out scores in [0, 1].
    labels: `[N]` 0/1 accept labels.
    target_precision: see `choose_threshold`.
    num_bins: calibration bins.

  Returns:
    {"num", "num_positive", "auroc", "auprc", "ece", "threshold": {...}, "calibration": bins,
    "curves": {"roc": {...}, "pr": {...}}}; the curves feed `plot_report`.
  """
  scores, labels = _check(scores, labels)
  ece, bins = expected_calibration_error(scores, labels, num_bins)
  fpr, tpr, roc_thr = roc_curve(scores, labels)
  precision, recall, pr_thr = pr_curve(scores, labels)
  return {
      "num": int(labels.size),
      "num_positive": int(labels.sum()),
      "auroc": roc_auc(scores, labels),
      "auprc": average_precision(scores, labels),
      "ece": ece,
      "threshold": dataclasses.asdict(choose_threshold(scores, labels, target_precision)),
      "calibration": bins,
      "curves": {"roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(),
                         "thresholds": roc_thr[1:].tolist()},
                 "pr": {"precision": precision.tolist(), "recall": recall.tolist(),
                        "thresholds": pr_thr.tolist()}},
  }


def plot_report(report: dict[str, Any], out_dir: str | os.PathLike, prefix: str = "") -> list[str]:
  """Writes the ROC curve, PR curve and reliability diagram of an `evaluate` dict as PNGs.

  Args:
    report: from `evaluate`.
    out_dir: directory to write into (created).
    prefix: file name prefix, e.g. "ratings_".

  Returns:
    The paths written.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  roc, pr, cal, t = (report["curves"]["roc"], report["curves"]["pr"], report["calibration"],
                     report["threshold"])
  paths = []

  def save(fig, name):
    path = os.path.join(os.fspath(out_dir), f"{prefix}{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)

  fig, ax = plt.subplots(figsize=(4, 4))
  ax.plot(roc["fpr"], roc["tpr"], label=f"AUROC {report['auroc']:.3f}")
  ax.plot([0, 1], [0, 1], "k:", lw=0.8)
  ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
  ax.legend(loc="lower right")
  save(fig, "roc")

  fig, ax = plt.subplots(figsize=(4, 4))
  ax.step(np.r_[0.0, pr["recall"]], np.r_[1.0, pr["precision"]], where="pre",
          label=f"AUPRC {report['auprc']:.3f}")
  ax.plot([t["recall"]], [t["precision"]], "ro",
          label=f"threshold {t['threshold']:.3f}")
  ax.axhline(t["target_precision"], color="grey", ls=":", lw=0.8)
  ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", ylim=(0, 1.02))
  ax.legend(loc="lower left")
  save(fig, "pr")

  fig, ax = plt.subplots(figsize=(4, 4))
  edges = np.asarray(cal["edges"])
  centres, rate = (edges[:-1] + edges[1:]) / 2, np.asarray(cal["accept_rate"], np.float64)
  ax.bar(centres, np.nan_to_num(rate), width=np.diff(edges), edgecolor="k", alpha=0.6,
         label="observed accept rate")
  ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfect calibration")
  ax.set(xlabel="predicted score", ylabel="accept rate",
         title=f"Reliability (ECE {report['ece']:.3f})", xlim=(0, 1), ylim=(0, 1))
  ax.legend(loc="upper left")
  save(fig, "reliability")
  return paths
