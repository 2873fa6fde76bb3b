"""The Selector's training objective: masked, rater-weighted terms over a mixed batch.

A Selector batch mixes examples that carry different labels (see `fundax.selector.data`): a
graded image has an accept target and maybe criterion flags, a human rating may have only a
1-5 score, a pairwise preference has two images and no absolute label at all. Every label comes
with a 0/1 mask, and every row with a rater weight, so each term applies only where its label
exists:

  accept     BCE of the overall logit against the accept target (1, 0, or soft: 0.5 for an
             EyeQ/phantom "usable" grade);
  score      BCE of the overall logit against the 1-5 score mapped to (score - 1) / 4;
  pair       Bradley-Terry: BCE of `logit_a - logit_b` against 1 (a preferred), 0 (b) or 0.5
             (tie), on the row of image a; `pair_other` indexes image b's row;
  criteria   BCE of each criterion logit against its flag (True = criterion met).

Each term is `sum(mask * weight * loss) / max(sum(mask), 1)`: normalised by the number of
labels present, not by the sum of weights, so a rater weight of 2 counts an example twice and
scaling every weight by k scales the term by k. The total is the `loss_weights`-weighted sum.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

TERMS = ("accept", "score", "pair", "criteria")


def masked_mean(values: jax.Array, mask: jax.Array, weight: jax.Array | None = None
                ) -> jax.Array:
  """`sum(mask * weight * values) / max(sum(mask), 1)`; masked entries contribute exactly 0.

  Args:
    values: per-label losses, any shape.
    mask: 0/1 (or bool) of the same shape: whether the label exists.
    weight: per-label weights broadcastable to `values`, or None for 1.

  Returns:
    float32 scalar.
  """
  mask = mask.astype(jnp.float32)
  w = mask if weight is None else mask * weight
  # where(), not a product: a NaN from a garbage masked label must not leak into the sum.
  total = jnp.sum(jnp.where(w != 0, values * w, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1.0)


def bradley_terry_loss(logit_a: jax.Array, logit_b: jax.Array, target: jax.Array) -> jax.Array:
  """Per-pair Bradley-Terry negative log-likelihood.

  `P(a preferred) = sigmoid(logit_a - logit_b)`; the loss is the BCE of that probability
  against `target` (1: a preferred, 0: b preferred, 0.5: tie). At equal logits it is log 2
  whatever the target; a tie is minimised by equal logits.

  Args:
    logit_a: `[P]` overall logits of the first images.
    logit_b: `[P]` overall logits of the second images.
    target: `[P]` in [0, 1].

  Returns:
    `[P]` losses.
  """
  return optax.sigmoid_binary_cross_entropy(logit_a - logit_b, target)


def score_target(score: Any) -> Any:
  """A 1-5 rating mapped linearly onto an acceptability target in [0, 1]: (score - 1) / 4."""
  return (score - 1.0) / 4.0


def selector_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                  loss_weights: Mapping[str, float]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The total loss of a mixed batch and its terms.

  Args:
    outputs: the Selector's {"logit": [B], "criteria": [B, C]}.
    batch: arrays [B, ...]: "weight" (rater weight), "accept"/"accept_mask",
      "score_target"/"score_mask", "criteria"/"criteria_mask" ([B, C]), "pair_other" (int row
      of the other image), "pair_target", "pair_mask" (1 on the row of image a).
    loss_weights: multiplier of each term in `TERMS`.

  Returns:
    `(total, metrics)`: metrics hold each term and the number of labels behind it.
  """
  logit, crit = outputs["logit"], outputs["criteria"]
  w = batch["weight"]
  bce = optax.sigmoid_binary_cross_entropy
  terms = {
      "accept": masked_mean(bce(logit, batch["accept"]), batch["accept_mask"], w),
      "score": masked_mean(bce(logit, batch["score_target"]), batch["score_mask"], w),
      "pair": masked_mean(
          bradley_terry_loss(logit, logit[batch["pair_other"]], batch["pair_target"]),
          batch["pair_mask"], w),
      "criteria": masked_mean(bce(crit, batch["criteria"]), batch["criteria_mask"],
                              w[:, None]),
  }
  total = sum(loss_weights[name] * terms[name] for name in TERMS)
  metrics = {f"loss_{name}": value for name, value in terms.items()}
  metrics.update({f"num_{name}": jnp.sum(batch[f"{name}_mask"].astype(jnp.float32))
                  for name in TERMS})
  metrics["loss"] = total
  return total, metrics
