"""Downstream utility (TSTR, "train on synthetic, test on real"): is the synthetic data useful?

A DR-grade classifier (the evaluator architecture with a single 5-way head, trained from
scratch with its own seed, so it shares nothing with the evaluator or the Selector) is trained
on synthetic images alone and on synthetic + real images, then tested on held-out real images
(or held-out phantom images standing in for them). Reported per training set: quadratic
weighted kappa of the grade, accuracy, and the AUROC of referable DR (grade >= 2) scored by the
predicted probability of grades 2-4.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import jax
import numpy as np

from fundax.eval import consistency
from fundax.eval import evaluator as evaluator_lib
from fundax.eval import evaluator_train

log = logging.getLogger(__name__)

DEFAULTS = {"width": 16, "stage_sizes": (1, 1, 1), "stem_stride": 4, "steps": 200,
            "batch_size": 32, "lr": 3e-3, "seed": 1}


def train_classifier(images, labels, num_classes: int, config: Mapping | None = None, *,
                     head: str = "dr_grade", desc: str = "TSTR classifier"):
  """Trains a one-head classifier of the evaluator architecture from scratch.

  Shared by the TSTR utility classifier and the C2ST (fundax.eval.c2st).

  Args:
    images: [N, H, W, 3] float32 in [-1, 1].
    labels: [N] ints in [0, num_classes).
    num_classes: outputs of the head.
    config: overrides of DEFAULTS (width, stage_sizes, stem_stride, steps, batch_size, lr,
      seed).
    head: the head's name.
    desc: progress-bar label.

  Returns:
    (model, params).
  """
  c = {**DEFAULTS, **dict(config or {})}
  model = evaluator_lib.FundusEvaluator(width=c["width"], stage_sizes=tuple(c["stage_sizes"]),
                                        heads=((head, num_classes),),
                                        stem_stride=c["stem_stride"])
  images = np.asarray(images, np.float32)
  params = evaluator_lib.init_params(model, jax.random.key(c["seed"]), images.shape[1])
  optim_config = {"lr": c["lr"], "total_steps": c["steps"],
                  "warmup_steps": min(10, c["steps"] - 1), "grad_clip_norm": 1.0}
  state = evaluator_train.fit(model, params, optim_config, images,
                              {head: np.asarray(labels, np.int32)}, steps=c["steps"],
                              batch_size=c["batch_size"], seed=c["seed"], desc=desc)
  return model, state.params


def predict_classes(model, params, images, head: str) -> np.ndarray:
  """Class probabilities [N, K] of a one-head classifier from `train_classifier`."""
  return evaluator_lib.predict_proba(model, params, images)[head]


def grade_scores(y_true, probs) -> dict[str, float]:
  """QWK, accuracy and referable-DR AUROC from grade probabilities.

  Args:
    y_true: [N] true grades 0-4.
    probs: [N, 5] predicted grade probabilities.

  Returns:
    {"qwk", "accuracy", "referable_auroc", "n"}.
  """
  y_true, probs = np.asarray(y_true, int), np.asarray(probs, np.float64)
  pred = probs.argmax(-1)
  return {"qwk": consistency.quadratic_weighted_kappa(y_true, pred, 5),
          "accuracy": float((pred == y_true).mean()),
          "referable_auroc": consistency.auroc(
              y_true >= consistency.REFERABLE_DR_GRADE,
              probs[:, consistency.REFERABLE_DR_GRADE:].sum(-1)),
          "n": int(len(y_true))}


def tstr(synthetic_images, synthetic_grades, test_images, test_grades, *, real_images=None,
         real_grades=None, matched_images=None, matched_grades=None,
         config: Mapping | None = None) -> dict[str, dict[str, float]]:
  """Train-on-synthetic / test-on-real scores, beside their ceiling and a negative control.

  Args:
    synthetic_images: [N, H, W, 3] generated images.
    synthetic_grades: [N] DR grades the prompts asked for.
    test_images: [T, H, W, 3] held-out real (or phantom) images.
    test_grades: [T] their DR grades.
    real_images: optional [R, H, W, 3] real training images for the synthetic + real arm.
    real_grades: optional [R] their grades.
    matched_images: optional [N, H, W, 3] real images for the same prompts (e.g.
      `references.prompt_matched`): the "real" arm (train on real, the ceiling the synthetic
      arm is read against) and the "shuffled labels" arm (the same images with their grades
      permuted: what a set that carries no grade scores).
    matched_grades: their DR grades.
    config: classifier overrides (see DEFAULTS).

  Returns:
    {"synthetic": scores, ["synthetic+real", "real", "shuffled labels"]: scores}, each from
    `grade_scores` on the test set.
  """
  arms = {"synthetic": (synthetic_images, synthetic_grades)}
  if real_images is not None:
    arms["synthetic+real"] = (np.concatenate([synthetic_images, real_images]),
                              np.concatenate([synthetic_grades, real_grades]))
  if matched_images is not None:
    grades = np.asarray(matched_grades)
    arms["real"] = (matched_images, grades)
    arms["shuffled labels"] = (matched_images,
                               np.random.default_rng(0).permutation(grades))
  out = {}
  for name, (images, grades) in arms.items():
    model, params = train_classifier(images, grades, 5, config)
    out[name] = grade_scores(test_grades, predict_classes(model, params, test_images,
                                                          "dr_grade"))
    log.info("TSTR %s: %s", name, out[name])
  return out
