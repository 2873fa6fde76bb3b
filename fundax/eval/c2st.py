"""The classifier two-sample test (C2ST): can a small network tell two image sets apart?

A small CNN (the evaluator architecture with one two-way head, trained from scratch with its
own seed) learns to separate set A (e.g. held-out phantoms) from set B (generated images) on
half of each set and is tested on the other half, then the halves swap, so every image is
classified once by a network that never saw it (Lopez-Paz & Oquab 2017). Its accuracy is 0.5
when the sets are indistinguishable and 1.0 when every image gives itself away; the 95%
interval is Wilson's for a binomial proportion over the 2N test decisions. It is the machine
analogue of the reader studies text-to-fundus papers report, where ophthalmologists told real
from synthetic photographs apart at 54-62%.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from fundax.eval import utility

log = logging.getLogger(__name__)

DEFAULTS = {"width": 16, "stage_sizes": (1, 1, 1), "stem_stride": 4, "steps": 150,
            "batch_size": 32, "lr": 3e-3, "seed": 2}
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion (good at small n and near 0 or 1)."""
  if trials < 1:
    return float("nan"), float("nan")
  p = successes / trials
  denom = 1 + z * z / trials
  centre = (p + z * z / (2 * trials)) / denom
  half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
  return float(centre - half), float(centre + half)


def _halves(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  perm = rng.permutation(n)
  return perm[:n // 2], perm[n // 2:]


def c2st(images_a, images_b, config: Mapping | None = None) -> dict:
  """Two-fold classifier two-sample test between two image sets of the same size.

  Args:
    images_a: [N, H, W, 3] float in [-1, 1] (e.g. real or phantom images).
    images_b: [M, H, W, 3] the other set (e.g. generated images).
    config: overrides of DEFAULTS (classifier width, stages, stem stride, steps, batch, lr,
      seed).

  Returns:
    {"accuracy": fraction of test decisions right, "ci95": [low, high], "n": test
    decisions, "fold_accuracy": [two floats]}.

  Raises:
    ValueError: a set with fewer than 4 images.
  """
  c = {**DEFAULTS, **dict(config or {})}
  a, b = np.asarray(images_a, np.float32), np.asarray(images_b, np.float32)
  if min(len(a), len(b)) < 4:
    raise ValueError(f"C2ST needs at least 4 images per set, got {len(a)} and {len(b)}")
  rng = np.random.default_rng(c["seed"])
  a_halves, b_halves = _halves(len(a), rng), _halves(len(b), rng)
  correct, total, folds = 0, 0, []
  for fold in range(2):
    train_a, test_a = a[a_halves[fold]], a[a_halves[1 - fold]]
    train_b, test_b = b[b_halves[fold]], b[b_halves[1 - fold]]
    images = np.concatenate([train_a, train_b])
    labels = np.concatenate([np.zeros(len(train_a)), np.ones(len(train_b))]).astype(np.int32)
    model, params = utility.train_classifier(images, labels, 2, {**c, "seed": c["seed"] + fold},
                                             head="set", desc="C2ST classifier")
    probs = utility.predict_classes(model, params, np.concatenate([test_a, test_b]), "set")
    truth = np.concatenate([np.zeros(len(test_a)), np.ones(len(test_b))])
    hits = int((probs.argmax(-1) == truth).sum())
    folds.append(hits / len(truth))
    correct, total = correct + hits, total + len(truth)
  low, high = wilson_interval(correct, total)
  out = {"accuracy": correct / total, "ci95": [low, high], "n": total, "fold_accuracy": folds}
  log.info("C2ST: %s", out)
  return out
