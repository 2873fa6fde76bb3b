"""Reading the feedback app's export: human (or simulated) ratings as JSON Lines.

This module owns the Selector's side of the export contract. One JSON object per line, either

  {"kind": "rating", "candidate_id": str, "image_path": absolute PNG path, "prompt": str|null,
   "rater": str, "rater_weight": float >= 0 (default 1), "simulated": bool (default false),
   "score": 1-5|null, "accept": bool|null,
   "criteria": {"optic_disc_clarity": bool|null, "vessel_structure": ...,
                "contrast_illumination": ..., "artifacts": ..., "prompt_match": ...}}

  {"kind": "pair", "image_a": path, "image_b": path, "prompt": str|null,
   "preferred": "a"|"b"|"tie", "rater": str, "rater_weight": float >= 0 (default 1)}

Criteria have two meanings, one on each side of this module, converted here and nowhere else:

  * in the file, a criterion is a PROBLEM FLAG, as `fundax.feedback.export` writes it: true =
    the rater ticked the box, i.e. saw a problem with that aspect ("artifacts": true =
    artefacts present; "prompt_match": true = the image does not match its prompt), false =
    no problem seen;
  * in `Rating.criteria` (and the Selector's criterion heads and targets), True = the
    criterion is MET ("artifacts": True = free of artefacts), so a good image scores high on
    every head.

`read_ratings` turns a flag f into `not f` and `write_ratings` writes `not met`; a missing
criterion or null is "not rated" on both sides. The reader is strict about what it uses: a line
that is not a JSON object, an unknown kind or criterion, a missing required field or a value of
the wrong type or range raises `RatingsFormatError` naming the file and line number. Extra
top-level fields (ids, timestamps) are ignored so the app can add metadata. Blank lines are
skipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any

from fundax.models.selector import CRITERIA

log = logging.getLogger(__name__)

PREFERENCES = {"a": 1.0, "b": 0.0, "tie": 0.5}  # preferred -> P(a preferred) target


class RatingsFormatError(ValueError):
  """A malformed line of a ratings export; the message names the file and line number."""


@dataclasses.dataclass(frozen=True)
class Rating:
  """One absolute rating of one image."""
  candidate_id: str
  image_path: str
  prompt: str | None
  rater: str
  rater_weight: float
  simulated: bool
  score: int | None
  accept: bool | None
  # Every name of CRITERIA -> True = criterion MET (no problem), False = problem flagged,
  # None = not rated. The inverse of the file's problem flags (see the module docstring).
  criteria: dict[str, bool | None]
  line: int  # 1-based line in the export, for messages


@dataclasses.dataclass(frozen=True)
class Pair:
  """One pairwise preference between two images for the same prompt."""
  image_a: str
  image_b: str
  prompt: str | None
  preferred: str  # "a", "b" or "tie"
  rater: str
  rater_weight: float
  line: int

  @property
  def target(self) -> float:
    """P(a preferred) target of the Bradley-Terry loss: 1, 0 or 0.5."""
    return PREFERENCES[self.preferred]


class _Line:
  """Field accessors that raise RatingsFormatError naming the line."""

  def __init__(self, obj: dict[str, Any], where: str):
    self.obj, self.where = obj, where

  def fail(self, message: str):
    raise RatingsFormatError(f"{self.where}: {message}")

  def get(self, key: str, types: tuple[type, ...], *, required: bool = True,
          nullable: bool = False, default: Any = None) -> Any:
    if key not in self.obj:
      if required:
        self.fail(f"missing required field {key!r}")
      return default
    value = self.obj[key]
    if value is None and nullable:
      return None
    # bool is an int in Python; a JSON true is never a number (or vice versa) here.
    if isinstance(value, bool) != (bool in types) or not isinstance(value, types):
      names = "/".join(t.__name__ for t in types) + ("/null" if nullable else "")
      self.fail(f"field {key!r} must be {names}, got {json.dumps(value)}")
    return value

  def path(self, key: str) -> str:
    value = self.get(key, (str,))
    if not os.path.isabs(value):
      self.fail(f"field {key!r} must be an absolute path, got {value!r}")
    return value

  def weight(self) -> float:
    value = float(self.get("rater_weight", (int, float), required=False, default=1.0))
    if not math.isfinite(value) or value < 0:
      self.fail(f"rater_weight must be a finite number >= 0, got {value}")
    return value


def _rating(f: _Line, line: int) -> Rating:
  score = f.get("score", (int,), nullable=True)
  if score is not None and not 1 <= score <= 5:
    f.fail(f"score must be an integer 1-5 or null, got {score}")
  raw = f.get("criteria", (dict,), required=False, nullable=True, default=None) or {}
  unknown = sorted(set(raw) - set(CRITERIA))
  if unknown:
    f.fail(f"unknown criteria {unknown}; known: {list(CRITERIA)}")
  flags = {}
  for name in CRITERIA:
    value = raw.get(name)
    if value is not None and not isinstance(value, bool):
      f.fail(f"criterion {name!r} must be true/false/null, got {json.dumps(value)}")
    flags[name] = value
  criteria = criteria_met(flags)
  return Rating(candidate_id=str(f.get("candidate_id", (str, int))),
                image_path=f.path("image_path"),
                prompt=f.get("prompt", (str,), nullable=True),
                rater=str(f.get("rater", (str, int))),
                rater_weight=f.weight(),
                simulated=f.get("simulated", (bool,), required=False, default=False),
                score=score,
                accept=f.get("accept", (bool,), nullable=True),
                criteria=criteria, line=line)


def criteria_met(problem_flags: dict[str, bool | None]) -> dict[str, bool | None]:
  """File problem flags (true = problem seen) -> `Rating.criteria` (True = criterion met)."""
  return {name: None if flag is None else not flag for name, flag in problem_flags.items()}


def problem_flags(criteria: dict[str, bool | None]) -> dict[str, bool | None]:
  """`Rating.criteria` (True = met) -> the file's problem flags (true = problem seen)."""
  return {name: None if met is None else not met for name, met in criteria.items()}


def _pair(f: _Line, line: int) -> Pair:
  preferred = f.get("preferred", (str,))
  if preferred not in PREFERENCES:
    f.fail(f"preferred must be one of {sorted(PREFERENCES)}, got {preferred!r}")
  return Pair(image_a=f.path("image_a"), image_b=f.path("image_b"),
              prompt=f.get("prompt", (str,), nullable=True), preferred=preferred,
              rater=str(f.get("rater", (str, int))), rater_weight=f.weight(), line=line)


def read_ratings(path: str | os.PathLike, *, check_files: bool = False
                 ) -> tuple[list[Rating], list[Pair]]:
  """Parses a ratings export.

  Args:
    path: the JSONL file.
    check_files: also require every image path to exist (named with its line when missing).

  Returns:
    `(ratings, pairs)` in file order.

  Raises:
    FileNotFoundError: the export, or (with `check_files`) an image it names, is missing.
    RatingsFormatError: a malformed line, naming `path:line`.
  """
  path = os.fspath(path)
  ratings, pairs = [], []
  with open(path, encoding="utf-8") as fh:
    for line, text in enumerate(fh, start=1):
      if not text.strip():
        continue
      where = f"{path}:{line}"
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        raise RatingsFormatError(f"{where}: not valid JSON ({e.msg})") from None
      if not isinstance(obj, dict):
        raise RatingsFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
      f = _Line(obj, where)
      kind = f.get("kind", (str,))
      if kind == "rating":
        ratings.append(_rating(f, line))
        files = [ratings[-1].image_path]
      elif kind == "pair":
        pairs.append(_pair(f, line))
        files = [pairs[-1].image_a, pairs[-1].image_b]
      else:
        f.fail(f"unknown kind {kind!r}; expected 'rating' or 'pair'")
      missing = [p for p in files if check_files and not os.path.isfile(p)]
      if missing:
        raise FileNotFoundError(f"{where}: image not found: {missing[0]}")
  log.info("read %d ratings and %d pairs from %s", len(ratings), len(pairs), path)
  return ratings, pairs


def write_ratings(path: str | os.PathLike, ratings: list[Rating], pairs: list[Pair]) -> None:
  """Writes ratings and pairs in the export format (`read_ratings` reads them back).

  Criteria are written as the export's problem flags (`problem_flags`), so a file written
  here means the same as one the feedback app exports.

  Args:
    path: the JSONL file to write.
    ratings: absolute ratings.
    pairs: pairwise preferences.
  """
  with open(path, "w", encoding="utf-8") as fh:
    for r in ratings:
      obj = {"kind": "rating", **dataclasses.asdict(r)}
      obj["criteria"] = problem_flags(r.criteria)
      del obj["line"]
      fh.write(json.dumps(obj) + "\n")
    for p in pairs:
      obj = {"kind": "pair", **dataclasses.asdict(p)}
      del obj["line"]
      fh.write(json.dumps(obj) + "\n")
