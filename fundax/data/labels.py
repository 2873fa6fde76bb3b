"""The clinical label record shared by the phantom, the caption writer and the dataset builders.

A `FundusLabels` holds what is known about one colour fundus photograph, in clinical grading
terms. Every field may be `None`, meaning *unknown*: real datasets only grade some things (EyePACS
gives a DR grade, EyeQ a quality grade), and the caption writer must state only known facts.
The phantom fills in every field, because it knows exactly what it drew.

Grading scales used throughout fundax:
  * diabetic retinopathy: ICDR 0-4 (0 none, 1 mild NPDR, 2 moderate NPDR, 3 severe NPDR, 4 PDR);
    diabetic macular oedema (DME) as a boolean (exudates within one disc diameter of the fovea);
  * glaucoma: vertical cup-to-disc ratio plus a boolean for a glaucomatous disc;
  * AMD: simplified AREDS stage 0-3 (0 none, 1 early: medium drusen, 2 intermediate: large drusen
    or pigment change, 3 late: geographic atrophy);
  * hypertensive retinopathy: Keith-Wagener-Barker grade 0-4 (1 arteriolar narrowing,
    2 AV nicking, 3 flame haemorrhages / cotton-wool spots / exudates, 4 papilloedema);
  * image quality: EyeQ grades good / usable / reject.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

LATERALITIES = ("right", "left")
FIELDS = ("macula", "disc")
QUALITIES = ("good", "usable", "reject")
PIGMENTATIONS = ("light", "medium", "dark")

# Lesion / sign names used as keys of `FundusLabels.findings` (value: count of drawn instances,
# or 1 for a present diffuse sign such as arteriolar narrowing).
FINDINGS = (
    "microaneurysms",
    "dot_blot_haemorrhages",
    "flame_haemorrhages",
    "hard_exudates",
    "cotton_wool_spots",
    "venous_beading",
    "irma",
    "neovascularisation",
    "drusen",
    "pigment_change",
    "geographic_atrophy",
    "arteriolar_narrowing",
    "av_nicking",
    "papilloedema",
    "disc_haemorrhage",
)

# Image-quality defects (EyeQ-style reasons for a usable / reject grade).
QUALITY_DEFECTS = (
    "defocus",
    "uneven_illumination",
    "underexposure",
    "overexposure",
    "eyelash_artifact",
    "dust_artifact",
    "off_centre",
)

DR_GRADE_NAMES = (
    "no diabetic retinopathy",
    "mild non-proliferative diabetic retinopathy",
    "moderate non-proliferative diabetic retinopathy",
    "severe non-proliferative diabetic retinopathy",
    "proliferative diabetic retinopathy",
)


@dataclasses.dataclass(frozen=True)
class FundusLabels:
  """What is known about one fundus image. `None` everywhere means "not graded"."""

  laterality: str | None = None  # "right" (OD) or "left" (OS)
  field: str | None = None  # "macula" (macula-centred) or "disc" (disc-centred)
  quality: str | None = None  # EyeQ grade: "good", "usable", "reject"
  dr_grade: int | None = None  # ICDR 0-4
  dme: bool | None = None  # diabetic macular oedema
  cdr: float | None = None  # vertical cup-to-disc ratio, 0-1
  glaucoma: bool | None = None  # glaucomatous optic disc
  amd_stage: int | None = None  # simplified AREDS 0-3
  hypertensive_grade: int | None = None  # Keith-Wagener-Barker 0-4
  pigmentation: str | None = None  # "light", "medium", "dark" fundus
  findings: dict[str, int] | None = None  # lesion name (FINDINGS) -> count; None = not graded
  quality_defects: tuple[str, ...] | None = None  # subset of QUALITY_DEFECTS
  keywords: tuple[str, ...] | None = None  # free diagnostic keywords from a real dataset (ODIR)

  def __post_init__(self):
    _check_choice("laterality", self.laterality, LATERALITIES)
    _check_choice("field", self.field, FIELDS)
    _check_choice("quality", self.quality, QUALITIES)
    _check_choice("pigmentation", self.pigmentation, PIGMENTATIONS)
    _check_range("dr_grade", self.dr_grade, 0, 4)
    _check_range("amd_stage", self.amd_stage, 0, 3)
    _check_range("hypertensive_grade", self.hypertensive_grade, 0, 4)
    if self.cdr is not None and not 0.0 <= self.cdr <= 1.0:
      raise ValueError(f"cdr must be in [0, 1], got {self.cdr}")
    if self.findings is not None:
      unknown = set(self.findings) - set(FINDINGS)
      if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; known: {FINDINGS}")
    if self.quality_defects is not None:
      unknown = set(self.quality_defects) - set(QUALITY_DEFECTS)
      if unknown:
        raise ValueError(f"unknown quality defects {sorted(unknown)}; known: {QUALITY_DEFECTS}")

  def flipped(self) -> FundusLabels:
    """Labels of the horizontally mirrored image: only the laterality changes."""
    if self.laterality is None:
      return self
    other = "left" if self.laterality == "right" else "right"
    return dataclasses.replace(self, laterality=other)

  def present(self, finding: str) -> bool | None:
    """Whether a finding was drawn/graded present; None when findings are unknown."""
    if self.findings is None:
      return None
    return self.findings.get(finding, 0) > 0

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    for k in ("quality_defects", "keywords"):
      if d[k] is not None:
        d[k] = list(d[k])
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> FundusLabels:
    d = dict(d)
    for k in ("quality_defects", "keywords"):
      if d.get(k) is not None:
        d[k] = tuple(d[k])
    known = {f.name for f in dataclasses.fields(cls)}
    extra = set(d) - known
    if extra:
      raise ValueError(f"unknown label fields {sorted(extra)}")
    return cls(**d)

  @classmethod
  def from_json(cls, s: str | bytes) -> FundusLabels:
    return cls.from_dict(json.loads(s))


def _check_choice(name, value, choices):
  if value is not None and value not in choices:
    raise ValueError(f"{name} must be one of {choices} or None, got {value!r}")


def _check_range(name, value, lo, hi):
  if value is not None and not (isinstance(value, int) and lo <= value <= hi):
    raise ValueError(f"{name} must be an int in [{lo}, {hi}] or None, got {value!r}")
