"""Clinical captions written from a label record: the text the generator is conditioned on.

This module owns the wording. `caption(labels, style)` states every known fact of a
`FundusLabels` record, and nothing else, in one of `NUM_STYLES` phrasings:
  0. full report sentences ("Colour fundus photograph of the right eye, macula-centred, ...");
  1. terse report with standard abbreviations (OD/OS, NPDR/PDR, DME, CDR, AMD);
  2. a one-line, semicolon-separated findings list;
  3. narrative prose.
All styles carry the same facts, so `parse_caption` (in `caption_parser`, re-exported here)
recovers the same record from any of them.

Wording rules that the rest of fundax relies on:
  * a `None` field is never mentioned; clinically relevant negatives ("no diabetic retinopathy",
    "no macular oedema") are stated only when the field is known to be negative;
  * laterality is stated in every style when known and is the only left/right word, so a
    horizontal flip (`labels.flipped()`) changes the caption's laterality and nothing else;
  * lesions are listed only when findings are known (counts become quantity words), each under
    the diagnosis that explains it (DR before hypertensive retinopathy), the rest as "other";
  * grades use ICDR (DR), Keith-Wagener-Barker (hypertensive retinopathy) and simplified AREDS
    (AMD) names; spelling is British (haemorrhage, oedema, colour, centred);
  * free dataset keywords (ODIR) are quoted as given in a final "Keywords: ..." sentence, so
    keywords must not contain '.' or ';'.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fundax.data import labels as labels_lib
from fundax.data.caption_parser import parse_caption  # re-exported: captions.parse_caption

__all__ = ["NUM_STYLES", "CDR_DECIMALS", "caption", "captions", "random_caption",
           "format_cdr", "parse_caption"]

NUM_STYLES = 4
CDR_DECIMALS = 2  # the cup-to-disc ratio is printed to (at most) this many decimals

_DR_SHORT = ("no DR", "mild NPDR", "moderate NPDR", "severe NPDR", "PDR")
_AMD_NAMES = (None, "early AMD", "intermediate AMD", "late AMD")
_QUALITY_WORDS = {"good": "good", "usable": "usable", "reject": "ungradable"}
_PIGMENT_FULL = {"light": "lightly pigmented, tessellated fundus",
                 "medium": "moderately pigmented fundus", "dark": "darkly pigmented fundus"}
_PIGMENT_SHORT = {"light": "light tessellated fundus", "medium": "medium fundus pigmentation",
                  "dark": "dark fundus"}
_PIGMENT = (_PIGMENT_FULL, _PIGMENT_SHORT, _PIGMENT_SHORT, _PIGMENT_FULL)  # by style
_CDR_PHRASE = ("Cup-to-disc ratio {}", "CDR {}", "CDR {}", "The cup-to-disc ratio is {}")
_DEFECT_WORDS = {
    "defocus": "defocus",
    "uneven_illumination": "uneven illumination",
    "underexposure": "underexposure",
    "overexposure": "overexposure",
    "eyelash_artifact": "eyelash artefact",
    "dust_artifact": "dust artefact",
    "off_centre": "off-centre framing",
}
# Lesion wording: (plural, singular); singular is None for diffuse signs, which get no
# quantity word.
_LESION_WORDS = {
    "microaneurysms": ("microaneurysms", "microaneurysm"),
    "dot_blot_haemorrhages": ("dot-blot haemorrhages", "dot-blot haemorrhage"),
    "flame_haemorrhages": ("flame haemorrhages", "flame haemorrhage"),
    "hard_exudates": ("hard exudates", "hard exudate"),
    "cotton_wool_spots": ("cotton-wool spots", "cotton-wool spot"),
    "venous_beading": ("venous beading", None),
    "irma": ("IRMA", None),
    "neovascularisation": ("neovascularisation", None),
    "drusen": ("drusen", "druse"),
    "pigment_change": ("pigmentary change", None),
    "geographic_atrophy": ("geographic atrophy", None),
    "arteriolar_narrowing": ("arteriolar narrowing", None),
    "av_nicking": ("AV nicking", None),
    "papilloedema": ("papilloedema", None),
    "disc_haemorrhage": ("disc haemorrhage", None),
}
# Diagnoses that explain each lesion, in order of preference: a lesion is listed under the first
# one that the record states as present (flame haemorrhages go with DR before hypertension).
_OWNERS = {
    "microaneurysms": ("dr",), "dot_blot_haemorrhages": ("dr",),
    "flame_haemorrhages": ("dr", "hr"), "hard_exudates": ("dr", "hr"),
    "cotton_wool_spots": ("dr", "hr"), "venous_beading": ("dr",), "irma": ("dr",),
    "neovascularisation": ("dr",), "drusen": ("amd",), "pigment_change": ("amd",),
    "geographic_atrophy": ("amd",), "arteriolar_narrowing": ("hr",), "av_nicking": ("hr",),
    "papilloedema": ("hr",), "disc_haemorrhage": ("glaucoma",),
}


@dataclasses.dataclass
class _Diagnosis:
  """One positive diagnosis with the lesion phrases listed under it."""
  full: str  # e.g. "moderate non-proliferative diabetic retinopathy"
  short: str  # e.g. "moderate NPDR"
  signs: list[str]  # plain phrases stated with the diagnosis, e.g. "neuroretinal rim thinning"
  lesions: list[tuple[str, int]]  # (finding name, count)


def format_cdr(cdr: float) -> str:
  """The cup-to-disc ratio as printed in captions: `CDR_DECIMALS` decimals, trailing zeros cut.

  Args:
    cdr: vertical cup-to-disc ratio in [0, 1].

  Returns:
    e.g. "0.3", "0.35", "1.0".
  """
  text = f"{cdr:.{CDR_DECIMALS}f}".rstrip("0")
  return text + "0" if text.endswith(".") else text


def _join(items: list[str], conj: str = "and") -> str:
  if len(items) <= 1:
    return "".join(items)
  return f"{', '.join(items[:-1])} {conj} {items[-1]}"


def _quantity(count: int) -> str:
  # Thresholds follow how graders describe lesion load: "a few" vs "scattered" vs "numerous".
  if count >= 20:
    return "numerous"
  if count >= 6:
    return "scattered"
  return "a few" if count >= 2 else "a single"


def _lesions(found: list[tuple[str, int]], counted: bool, amd_stage: int | None) -> list[str]:
  """Lesion phrases; a quantity word is said once for a run of lesions that share it."""
  phrases, previous = [], None
  for name, count in found:
    plural, singular = _LESION_WORDS[name]
    if name == "drusen" and amd_stage:
      # AREDS: early AMD has medium drusen, intermediate and late AMD large drusen.
      size = "medium" if amd_stage == 1 else "large"
      plural, singular = f"{size} drusen", f"{size} druse"
    if not counted or singular is None:
      phrases.append(plural)
      previous = None
      continue
    quantity = _quantity(count)
    noun = singular if count == 1 else plural
    phrases.append(noun if quantity == previous else f"{quantity} {noun}")
    previous = quantity
  return phrases


def _diagnoses(labels: labels_lib.FundusLabels):
  """Splits a record into positive diagnoses, unexplained lesions and known negatives."""
  dx: dict[str, _Diagnosis] = {}
  negatives: list[tuple[str, str]] = []  # (full, short) names of diagnoses known absent
  if labels.dr_grade is not None:
    if labels.dr_grade:
      dx["dr"] = _Diagnosis(labels_lib.DR_GRADE_NAMES[labels.dr_grade],
                            _DR_SHORT[labels.dr_grade], [], [])
    else:
      negatives.append(("diabetic retinopathy", "DR"))
  if labels.dme is not None:
    if labels.dme:
      dx["dme"] = _Diagnosis("diabetic macular oedema", "DME", [], [])
    else:
      negatives.append(("macular oedema", "DME"))
  if labels.glaucoma is not None:
    if labels.glaucoma:
      dx["glaucoma"] = _Diagnosis("glaucomatous optic disc", "glaucomatous disc",
                                  ["neuroretinal rim thinning"], [])
    else:
      negatives.append(("glaucoma", "glaucoma"))
  if labels.amd_stage is not None:
    if labels.amd_stage:
      name = _AMD_NAMES[labels.amd_stage]
      dx["amd"] = _Diagnosis(name, name, [], [])
    else:
      negatives.append(("AMD", "AMD"))
  if labels.hypertensive_grade is not None:
    if labels.hypertensive_grade:
      name = f"grade {labels.hypertensive_grade} hypertensive retinopathy"
      dx["hr"] = _Diagnosis(f"KWB {name}", name, [], [])
    else:
      negatives.append(("hypertensive retinopathy", "hypertensive retinopathy"))
  others: list[tuple[str, int]] = []
  for name in labels_lib.FINDINGS:  # fixed order keeps captions deterministic
    count = (labels.findings or {}).get(name, 0)
    if count <= 0:
      continue
    owner = next((o for o in _OWNERS[name] if o in dx), None)
    (dx[owner].lesions if owner else others).append((name, count))
  return list(dx.values()), others, negatives


def _header_parts(labels: labels_lib.FundusLabels, terse: bool) -> dict:
  """The header facts as words: "eye", "field", "quality" (str) and "defects" (list)."""
  parts = {}
  if labels.laterality is not None:
    parts["eye"] = ("OD" if labels.laterality == "right" else "OS") if terse else (
        f"{labels.laterality} eye")
  if labels.field is not None:
    parts["field"] = f"{labels.field}-centred"
  if labels.quality is not None:
    parts["quality"] = _QUALITY_WORDS[labels.quality]
  if labels.quality_defects:
    parts["defects"] = [_DEFECT_WORDS[d] for d in labels_lib.QUALITY_DEFECTS
                        if d in labels.quality_defects]
  return parts


# Each style returns (header, diagnoses, negatives) sentences; `caption` interleaves the shared
# parts so that the visually salient facts come first and a tokenizer that truncates a long
# caption drops the negatives, not the lesions.


def _style_full(labels, dx, others, negatives):
  h = _header_parts(labels, terse=False)
  head = "Colour fundus photograph" + (f" of the {h['eye']}" if "eye" in h else "")
  if "field" in h:
    head += f", {h['field']}"
  if "quality" in h:
    head += f", {h['quality']} quality"
  if "defects" in h:
    head += f"{',' if 'quality' not in h else ''} with {_join(h['defects'])}"
  body = []
  for d in dx:
    signs = d.signs + _lesions(d.lesions, True, labels.amd_stage)
    body.append(d.full[0].upper() + d.full[1:] + (f" with {_join(signs)}" if signs else ""))
  if others:
    body.append("Other findings: " + _join(_lesions(others, True, None)))
  negs = ["No " + _join([n for n, _ in negatives], "or")] if negatives else []
  return [head], body, negs


def _style_terse(labels, dx, others, negatives):
  h = _header_parts(labels, terse=True)
  head = [h[k] for k in ("eye", "field") if k in h]
  if "quality" in h or "defects" in h:
    quality = f"{h['quality']} quality" if "quality" in h else ""
    defects = ", ".join(h.get("defects", []))
    head.append(f"{quality} ({defects})" if quality and defects else quality or defects)
  body = []
  for d in dx:
    signs = d.signs + _lesions(d.lesions, False, labels.amd_stage)
    body.append(d.short[0].upper() + d.short[1:] + (f": {', '.join(signs)}" if signs else ""))
  if others:
    body.append("Also: " + ", ".join(_lesions(others, False, None)))
  negs = ["No " + _join([s for _, s in negatives], "or")] if negatives else []
  return [", ".join(head)] if head else [], body, negs


def _style_list(labels, dx, others, negatives):
  h = _header_parts(labels, terse=False)
  head = [h[k] for k in ("eye", "field") if k in h]
  if "quality" in h:
    head.append(f"{h['quality']} quality")
  head += h.get("defects", [])
  body = []
  for d in dx:
    signs = d.signs + _lesions(d.lesions, True, labels.amd_stage)
    body.append(d.short + (f": {', '.join(signs)}" if signs else ""))
  body += _lesions(others, True, None)
  negs = ["no " + _join([s for _, s in negatives], "or")] if negatives else []
  return head, body, negs


def _style_narrative(labels, dx, others, negatives):
  h = _header_parts(labels, terse=False)
  adjectives = [f"{h['quality']}-quality"] if "quality" in h else []
  adjectives += [h["field"]] if "field" in h else []
  subject = " ".join(filter(None, [", ".join(adjectives), "fundus photograph"]))
  subject = ("An " if subject.startswith("ungradable") else "A ") + subject
  subject += f" of a {h['eye']}" if "eye" in h else ""
  subject += f" with {_join(h['defects'])}" if "defects" in h else ""
  shown = []
  for d in dx:
    signs = d.signs + _lesions(d.lesions, True, labels.amd_stage)
    shown.append(d.full + (f" with {_join(signs)}" if signs else ""))
  body = ["It shows " + "; ".join(shown)] if shown else []
  if others:
    body.append("Also seen: " + _join(_lesions(others, True, None)))
  negs = ["There is no " + _join([n for n, _ in negatives], "or")] if negatives else []
  return [subject], body, negs


_STYLES = (_style_full, _style_terse, _style_list, _style_narrative)


def caption(labels: labels_lib.FundusLabels, style: int = 0) -> str:
  """The clinical caption of a label record in one phrasing; deterministic per style.

  Args:
    labels: the record; only its known (non-None) fields are stated.
    style: phrasing, 0 <= style < NUM_STYLES (see the module docstring).

  Returns:
    The caption text.

  Raises:
    TypeError: `labels` is not a `FundusLabels`.
    ValueError: `style` is out of range.
  """
  if not isinstance(labels, labels_lib.FundusLabels):
    raise TypeError(f"caption() needs a FundusLabels, got {type(labels).__name__}")
  if not 0 <= style < NUM_STYLES:
    raise ValueError(f"style must be in [0, {NUM_STYLES}), got {style}")
  dx, others, negatives = _diagnoses(labels)
  head, body, negs = _STYLES[style](labels, dx, others, negatives)
  pigment, cdr, keywords = [], [], []
  if labels.pigmentation is not None:
    pigment = [_PIGMENT[style][labels.pigmentation]]
  if labels.cdr is not None:
    cdr = [_CDR_PHRASE[style].format(format_cdr(labels.cdr))]
  if labels.keywords:
    keywords = [f"{'k' if style == 2 else 'K'}eywords: {', '.join(labels.keywords)}"]
  parts = head + pigment + body + cdr + negs + keywords
  if not parts:  # nothing is known: say what the image is rather than return ""
    parts = ["Colour fundus photograph"]
  if style == 2:
    return "; ".join(parts)
  return " ".join(p[0].upper() + p[1:] + "." for p in parts)


def captions(labels: labels_lib.FundusLabels) -> list[str]:
  """All `NUM_STYLES` captions of a record, in style order.

  Args:
    labels: the record.

  Returns:
    `[caption(labels, s) for s in range(NUM_STYLES)]`.
  """
  return [caption(labels, s) for s in range(NUM_STYLES)]


def random_caption(labels: labels_lib.FundusLabels, rng: np.random.Generator) -> str:
  """The caption of a record in a style drawn uniformly from `rng`.

  Args:
    labels: the record.
    rng: host-side generator (e.g. `np.random.default_rng([seed, epoch, index])`).

  Returns:
    `caption(labels, style)` for the drawn style.
  """
  return caption(labels, int(rng.integers(NUM_STYLES)))
