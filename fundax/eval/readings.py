"""Every independent reading of one image set, and the table that reads them against references.

`read(...)` measures one set of images with their prompts: fidelity to the reference set
(FD, KID, precision/recall on evaluator features), diversity (MS-SSIM within a prompt), prompt
consistency (the evaluator's readings of the attributes it reads at this resolution),
anatomy (laterality from the detected disc or fovea, vessel fraction) and, on request, the
privacy audit. `evaluate` (fundax/eval/run.py) reads the generated images, the prompt-matched
phantoms and the negative controls of `fundax.eval.references` the same way, and `rows`
builds the report's table from those readings: each metric's value on the generated images,
what real phantoms score (the floor of a distance, the ceiling of an agreement) and what its
negative control scores, with whether the control is separated from the real value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

from fundax.eval import anatomy_checks
from fundax.eval import consistency as consistency_lib
from fundax.eval import metrics as metrics_lib
from fundax.eval import privacy
from fundax.eval import ssim

# Directions: what "better" means for a metric, and how far (in `badness` units) its negative
# control must fall behind the real phantoms to count as separated.
LOWER, HIGHER, HALF, ONE = "lower", "higher", "closer to 0.5", "closer to 1"


def read(images, prompts: Sequence[str], evaluator, reference_features: np.ndarray, *,
         config: Mapping[str, Any], vessel_reference: float | None = None,
         anatomy: bool = True, reference_images=None) -> dict[str, Any]:
  """All independent readings of one image set.

  Fidelity runs on evaluator features standardised by the reference set
  (`metrics.standardise`).

  Args:
    images: [N, H, W, 3] float32 in [-1, 1].
    prompts: N prompts, one per image.
    evaluator: a loaded `evaluator.Evaluator`.
    reference_features: [M, D] evaluator features of the fidelity reference.
    config: evaluation options (kid_subsets, kid_subset_size, pr_k, seed, pixel_threshold,
      feature_threshold, num_pairs).
    vessel_reference: the mean vessel fraction the set's is divided by (the prompt-matched
      phantoms'); None: no ratio.
    anatomy: run the anatomy detectors (about 50 ms an image at 64 px).
    reference_images: with them, the privacy audit against these (training) images.

  Returns:
    {"fidelity", "diversity" (mean over prompts), "diversity_by_prompt", "consistency",
    ["anatomy"], ["privacy"], "features", "predictions"}.
  """
  features = evaluator.features(images)
  predictions = evaluator.predict(images)
  out = {"features": features, "predictions": predictions}
  out["fidelity"] = metrics_lib.fidelity(
      *metrics_lib.standardise(reference_features, features), k=config["pr_k"],
      kid_subsets=config["kid_subsets"], kid_subset_size=config["kid_subset_size"],
      seed=config["seed"])
  by_prompt = ssim.diversity_by_prompt(images, list(prompts))
  out["diversity_by_prompt"] = by_prompt
  out["diversity"] = float(np.mean(list(by_prompt.values()))) if by_prompt else float("nan")
  out["consistency"] = consistency_lib.consistency(list(prompts), predictions,
                                                   scored=evaluator.readable)
  if anatomy:
    fractions = np.array([anatomy_checks.vessel_fraction(x) for x in images])
    out["anatomy"] = {
        "laterality": anatomy_checks.disc_side_agreement(images, list(prompts)),
        "vessel_fraction": fractions.tolist(),
        "vessel_fraction_mean": float(fractions.mean()),
        "vessel_ratio": (float(fractions.mean() / vessel_reference)
                         if vessel_reference else float("nan"))}
  if reference_images is not None:
    out["privacy"] = privacy.audit(
        images, reference_images, features, evaluator.features(reference_images),
        pixel_threshold=config["pixel_threshold"],
        feature_threshold=config["feature_threshold"], num_pairs=config["num_pairs"])
  return out


def badness(value: float, better: str) -> float:
  """A metric value on a "higher is worse" scale (the direction `better` names)."""
  if better == LOWER:
    return value
  if better == HIGHER:
    return -value
  if better == HALF:
    return abs(value - 0.5)
  if better == ONE:
    return abs(np.log(max(value, 1e-6)))
  raise ValueError(f"unknown direction {better!r}")


def separated(real: float, control: float, better: str, relative: bool) -> bool:
  """Whether a negative control scores clearly worse than the real phantoms.

  Bounded metrics (fractions, accuracies, MS-SSIM, log ratios) need a margin of 0.05; an
  unbounded distance (`relative`: FD, KID) must be at least 1.5 times the real set's.
  """
  if not (np.isfinite(real) and np.isfinite(control)):
    return False
  if relative:
    return bool(control > 1.5 * real + 1e-12)
  return bool(badness(control, better) > badness(real, better) + 0.05)


@dataclasses.dataclass(frozen=True)
class Row:
  """One metric of the report's table.

  Attributes:
    name: what is measured.
    get: reading -> value.
    better: LOWER, HIGHER, HALF or ONE.
    control: the negative control's set name (`evaluate`'s sets).
    measured_by: the judge.
    relative: an unbounded distance (separation is judged by ratio, not margin).
  """
  name: str
  get: Callable[[Mapping[str, Any]], float]
  better: str
  control: str
  measured_by: str
  relative: bool = False


EVALUATOR = "independent evaluator"
ANATOMY = "anatomy detectors"
TABLE = (
    Row("Fréchet distance (evaluator features)", lambda r: r["fidelity"]["frechet_distance"],
        LOWER, "blurred", EVALUATOR, relative=True),
    Row("KID (evaluator features)", lambda r: r["fidelity"]["kid"], LOWER, "blurred",
        EVALUATOR, relative=True),
    Row("precision", lambda r: r["fidelity"]["precision"], HIGHER, "blurred", EVALUATOR),
    Row("recall", lambda r: r["fidelity"]["recall"], HIGHER, "blurred", EVALUATOR),
    Row("mean MS-SSIM within prompt (lower = more diverse)", lambda r: r["diversity"], LOWER,
        "collapsed", "MS-SSIM"),
    Row("consistency: share of stated attributes the evaluator confirms",
        lambda r: r["consistency"]["stated_agree_fraction"], HIGHER, "shifted prompts",
        EVALUATOR),
    Row("laterality: disc on the eye's side (macula-centred), fovea's side (disc-centred)",
        lambda r: r["anatomy"]["laterality"]["accuracy"], HIGHER, "mirrored", ANATOMY),
    Row("vessel fraction / prompt-matched phantoms'", lambda r: r["anatomy"]["vessel_ratio"],
        ONE, "blurred", ANATOMY),
)


def attribute_rows(readings: Mapping[str, Mapping[str, Any]]) -> list[Row]:
  """One consistency row per attribute the prompts state (scored or only shown)."""
  out = []
  for name, entry in readings["generated"]["consistency"].items():
    if isinstance(entry, Mapping) and "accuracy" in entry:
      note = "" if entry.get("scored", True) else " (not read reliably at this size: not scored)"
      out.append(Row(f"consistency: {name} accuracy{note}",
                     lambda r, name=name: r["consistency"].get(name, {}).get("accuracy",
                                                                             float("nan")),
                     HIGHER, "shifted prompts", EVALUATOR))
  return out


def table_row(row: Row, value: float, real: float, control: float) -> dict[str, Any]:
  """A table row as a JSON-able dict."""
  return {"metric": row.name, "generated": value, "phantoms": real, "control": control,
          "control_set": row.control, "better": row.better,
          "separated": separated(real, control, row.better, row.relative),
          "measured_by": row.measured_by}


def rows(readings: Mapping[str, Mapping[str, Any]], extra: Sequence[dict] = ()) -> list[dict]:
  """The report's table: TABLE and the per-attribute rows over the readings of `evaluate`.

  Args:
    readings: set name -> `read` output; "generated", "phantoms" (the second prompt-matched
      set) and each row's control set.
    extra: further rows already in `table_row` form (C2ST, TSTR, privacy).

  Returns:
    The rows, as `table_row` dicts.
  """
  out = []
  for row in (*TABLE, *attribute_rows(readings)):
    values = [row.get(readings[name]) for name in ("generated", "phantoms", row.control)]
    out.append(table_row(row, *map(float, values)))
  return out + list(extra)
