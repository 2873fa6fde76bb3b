"""The reward-hacking guard: independent held-out metrics every round, and the stop rule.

Every round the policy generates images for the held-out prompts (fixed noise), which the
independent evaluation suite (`fundax.eval`, sharing nothing with the Selector) measures:

  quality       mean evaluator probability that an image is of "good" EyeQ quality   (higher)
  consistency   fraction of its prompt's stated attributes the evaluator confirms in an
                image, averaged over images (partial credit: an all-or-nothing score is 0
                for every round of a small model and tells the guard nothing)  (higher)
  domain_fd     Fréchet distance to phantom reference images, evaluator features     (lower)
  diversity     mean MS-SSIM between samples of the same prompt                       (lower)
  privacy       fraction of images flagged as near-copies of the pre-training images  (lower)

`composite` folds them into one held-out score (higher is better): quality + consistency +
(1 - diversity) + (1 - privacy) - domain_fd / domain_fd at round 0; metrics of a custom
evaluation (tests) count with their sign in DIRECTIONS (default: higher is better).

The stop rule (`check`): the loop stops at a round whose held-out Selector reward is higher than
at the best round so far (by composite) while its composite has fallen below the best by more
than `tolerance`: the generator is pleasing the Selector at the expense of what independent
judges see. The best round's checkpoint is the one kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fundax.eval import consistency as consistency_lib
from fundax.eval import evaluator as evaluator_lib
from fundax.eval import metrics as metrics_lib
from fundax.eval import privacy
from fundax.eval import ssim

# +1: higher is better; -1: lower is better. Metrics divided by their round-0 value.
DIRECTIONS = {"quality": 1, "consistency": 1, "domain_fd": -1, "diversity": -1, "privacy": -1}
NORMALISED = ("domain_fd",)
_OFFSETS = {"diversity": 1.0, "privacy": 1.0}  # so that a perfect held-out set scores 4 - 1


@dataclasses.dataclass
class HeldoutEvaluator:
  """The independent evaluator with its phantom reference and pre-training image features.

  Attributes:
    evaluator: the loaded `fundax.eval.evaluator.Evaluator`.
    reference_images: [M, H, W, 3] phantom images (the domain reference for the FD).
    training_images: [M', H, W, 3] the images of the pre-training loss (the privacy audit set).
    pixel_threshold, feature_threshold: the privacy audit's near-copy thresholds.
  """
  evaluator: Any
  reference_images: np.ndarray
  training_images: np.ndarray
  pixel_threshold: float = 0.05
  feature_threshold: float = 0.2

  def __post_init__(self):
    self._reference_features = self.evaluator.features(self.reference_images)
    self._training_features = self.evaluator.features(self.training_images)

  def __call__(self, images, prompts: Sequence[str]) -> dict[str, float]:
    """The held-out metrics of generated images (see the module docstring)."""
    images = np.asarray(images, np.float32)
    features = self.evaluator.features(images)
    proba = evaluator_lib.predict_proba(self.evaluator.model, self.evaluator.params,
                                        self.evaluator.prepare(images))
    predictions = self.evaluator.predict(images)
    agree = consistency_lib.consistency(list(prompts), predictions,
                                        scored=self.evaluator.readable)["stated_agree_fraction"]
    div = ssim.diversity_by_prompt(images, list(prompts))
    audit = privacy.audit(images, self.training_images, features, self._training_features,
                          pixel_threshold=self.pixel_threshold,
                          feature_threshold=self.feature_threshold)
    return {"quality": float(proba["quality"][:, 0].mean()),
            "consistency": float(agree),
            "domain_fd": metrics_lib.frechet_distance(self._reference_features, features),
            "diversity": float(np.mean(list(div.values()))) if div else float("nan"),
            "privacy": float(audit["fraction_flagged"])}


def composite(metrics: Mapping[str, float], baseline: Mapping[str, float]) -> float:
  """One held-out score, higher is better (see the module docstring).

  Args:
    metrics: this round's held-out metrics.
    baseline: round 0's (the normalisation of NORMALISED metrics).

  Returns:
    The signed sum; NaN metrics are left out.
  """
  total = 0.0
  for name, value in metrics.items():
    value = float(value)
    if not np.isfinite(value):
      continue
    if name in NORMALISED:
      value = value / max(float(baseline[name]), 1e-12)
    sign = DIRECTIONS.get(name, 1)
    total += sign * value + (_OFFSETS.get(name, 0.0) if sign < 0 else 0.0)
  return total


def best_index(history: Sequence[Mapping[str, Any]]) -> int:
  """Index of the round with the highest composite (the earliest among ties)."""
  if not history:
    raise ValueError("no evaluated round yet")
  return int(np.argmax([h["composite"] for h in history]))


def check(history: Sequence[Mapping[str, Any]], tolerance: float) -> tuple[bool, str]:
  """Whether the last round shows reward hacking (the stop rule above) and why.

  Args:
    history: one record per evaluated round, oldest first, each with "round", "composite"
      and "reward" (mean held-out Selector score); the last may carry "best_reward_now", the
      best round's images rescored by the current Selector (which the loop may have
      retrained), compared instead of the best round's own reward.
    tolerance: how far below the best composite the last round may fall.

  Returns:
    (stop, reason); reason is "" when the loop continues.
  """
  if len(history) < 2:
    return False, ""
  best = history[best_index(history)]
  last = history[-1]
  fall = best["composite"] - last["composite"]
  before = last.get("best_reward_now", best["reward"])
  if last["reward"] > before and fall > tolerance:
    return True, (f"round {last['round']}: Selector reward rose {before:.4f} -> "
                  f"{last['reward']:.4f} while the held-out score fell {fall:.4f} below its "
                  f"best (round {best['round']}) beyond tolerance {tolerance}")
  return False, ""
