"""Simulated raters: ratings derived from the phantom's ground truth, with per-rater noise/bias.

Candidates imported with their label record (phantom runs, `importer.write_phantom_run`) have a
known truth, so a simulated rater can score them the way a careful clinician would, then be made
noisy, lenient or harsh. They exercise the whole feedback path (store, agreement, export,
Selector training) before any human has rated anything, and they measure how well agreement
statistics and the Selector recover a truth we know. Their raters are marked `is_simulated` and
every exported line says `simulated`.

The truth a simulated rater starts from:
  * score: EyeQ quality good -> 5, usable -> 3, reject -> 1;
  * criteria (problem flags) from the drawn quality defects: defocus -> optic_disc_clarity and
    vessel_structure; off_centre -> optic_disc_clarity; uneven_illumination, underexposure,
    overexposure -> contrast_illumination; eyelash_artifact, dust_artifact -> artifacts;
    prompt_match when a fact the prompt states (`captions.parse_caption`) disagrees with the
    candidate's labels;
  * accept: score >= 3 and the image matches its prompt.
Then per rater: score + bias + N(0, noise), rounded and clipped to 1-5; each flag flipped with
probability `flip_rate`; each candidate rated with probability `coverage`.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from fundax.data import caption_parser
from fundax.data import labels as labels_lib
from fundax.feedback import importer
from fundax.feedback import store as store_lib

QUALITY_SCORE = {"good": 5, "usable": 3, "reject": 1}
DEFECT_FLAGS = {
    "defocus": ("optic_disc_clarity", "vessel_structure"),
    "off_centre": ("optic_disc_clarity",),
    "uneven_illumination": ("contrast_illumination",),
    "underexposure": ("contrast_illumination",),
    "overexposure": ("contrast_illumination",),
    "eyelash_artifact": ("artifacts",),
    "dust_artifact": ("artifacts",),
}
CDR_TOLERANCE = 0.05  # captions print the CDR to two decimals
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RaterSpec:
  """How one simulated rater departs from the truth."""

  name: str
  noise: float = 0.5  # standard deviation of the score noise, in score points
  bias: float = 0.0  # added to every score (positive: lenient)
  flip_rate: float = 0.05  # probability of getting each criterion flag wrong
  coverage: float = 1.0  # fraction of candidates this rater rates
  weight: float = 1.0  # trust the Selector trainer should give this rater


DEFAULT_RATERS = (
    RaterSpec("sim-careful", noise=0.3, flip_rate=0.02),
    RaterSpec("sim-lenient", noise=0.6, bias=0.7, flip_rate=0.05),
    RaterSpec("sim-harsh", noise=0.8, bias=-0.7, flip_rate=0.1, coverage=0.8),
)


def matches_prompt(labels: labels_lib.FundusLabels, prompt: str) -> bool:
  """Whether every clinical fact the prompt states holds for the labels (quality excluded)."""
  stated = caption_parser.parse_caption(prompt)
  for name in importer.PROMPT_FACTS:
    want, have = getattr(stated, name), getattr(labels, name)
    if want is None or have is None:
      continue
    if name == "cdr":
      if abs(want - have) > CDR_TOLERANCE:
        return False
    elif want != have:
      return False
  return True


def true_rating(labels: labels_lib.FundusLabels, prompt: str) -> dict:
  """The noiseless rating of a candidate: {"score", "accept", "criteria"}."""
  criteria = {k: False for k in store_lib.CRITERIA}
  for defect in labels.quality_defects or ():
    for flag in DEFECT_FLAGS[defect]:
      criteria[flag] = True
  criteria["prompt_match"] = not matches_prompt(labels, prompt)
  score = QUALITY_SCORE[labels.quality]
  return {"score": score, "accept": score >= 3 and not criteria["prompt_match"],
          "criteria": criteria}


def noisy_rating(truth: dict, spec: RaterSpec, rng: np.random.Generator) -> dict:
  """One rater's version of the truth (see the module docstring)."""
  score = int(np.clip(np.round(truth["score"] + spec.bias + rng.normal(0, spec.noise)), 1, 5))
  criteria = {k: bool(v ^ (rng.random() < spec.flip_rate)) for k, v in truth["criteria"].items()}
  return {"score": score, "accept": score >= 3 and not criteria["prompt_match"],
          "criteria": criteria}


def simulate(store: store_lib.DB, *, raters=DEFAULT_RATERS, seed: int = 0,
             pairs: bool = True) -> dict[str, int]:
  """Rates every candidate with known truth by each simulated rater.

  Re-running with the same seed changes nothing (request ids are derived from the seed);
  another seed adds another round of ratings.

  Args:
    store: a Store or a database path / URL.
    raters: the RaterSpecs; raters are created on first use, by name.
    seed: randomness of the noise and coverage.
    pairs: also compare neighbouring candidates of each prompt pairwise.

  Returns:
    {"ratings": new ratings, "pairs": new pairwise preferences}.
  """
  store = store_lib.as_store(store)
  cands = [c for c in store.candidates() if c["labels"]]
  truths = {c["id"]: true_rating(labels_lib.FundusLabels.from_json(c["labels"]), c["prompt"])
            for c in cands}
  added = {"ratings": 0, "pairs": 0}
  for i, spec in enumerate(raters):
    rater = store.rater_by_name(spec.name)
    if rater is None:
      rater, _ = store.create_rater(spec.name, is_simulated=True, weight=spec.weight)
    elif not rater.is_simulated:
      raise ValueError(f"{spec.name!r} is a human rater; pick another name for a simulated one")
    rng = np.random.default_rng([seed, i])
    utility = {}
    for c in cands:
      if rng.random() >= spec.coverage:
        continue
      r = noisy_rating(truths[c["id"]], spec, rng)
      utility[c["id"]] = r["score"] - 2 * r["criteria"]["prompt_match"]
      _, new = store.add_rating(rater.id, c["id"], request_id=f"sim:{seed}:{c['id']}", **r)
      added["ratings"] += new
    if pairs:
      added["pairs"] += _rate_pairs(store, rater.id, cands, utility, seed)
  _log.info("simulated raters added %d ratings and %d pairs", added["ratings"], added["pairs"])
  return added


def _rate_pairs(store, rater_id, cands, utility, seed) -> int:
  """Neighbouring candidates of a prompt: the one with the higher noisy utility is preferred."""
  groups: dict[tuple, list[int]] = {}
  for c in cands:
    if c["id"] in utility:
      groups.setdefault((c["run_id"], c["prompt"]), []).append(c["id"])
  new = 0
  for ids in groups.values():
    for a, b in zip(ids, ids[1:]):
      ua, ub = utility[a], utility[b]
      preferred = "tie" if ua == ub else ("a" if ua > ub else "b")
      _, created = store.add_pair(rater_id, a, b, preferred, request_id=f"sim:{seed}:{a}:{b}")
      new += created
  return new
