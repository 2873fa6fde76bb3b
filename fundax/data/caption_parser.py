"""Reading clinical text back into a label record: the inverse of `captions.caption`.

`parse_caption(text)` recovers the facts a caption (or a free-form user prompt) states and
returns them as a `FundusLabels`; everything the text does not state is `None`. It is used to
check captions round-trip and, in evaluation, to check that a generated image matches the
prompt it was made from, so it accepts sloppy text too: any case, American spelling ("edema",
"hemorrhage", "centered"), "left eye" / "OS", "PDR", "severe NPDR", "proliferative diabetic
retinopathy", "cup to disc ratio of 0.7", "cup-disc ratio 0.7", "no DME", "without glaucoma".

What comes back, and what cannot:
  * `findings` holds presence only, as `{name: 1}` for every lesion mentioned positively (counts
    and quantity words are not recoverable); `None` when no lesion is mentioned;
  * `quality_defects` and `keywords` are `None` when none are mentioned (an empty tuple in the
    record is indistinguishable from an unknown one in text);
  * `cdr` has the printed precision;
  * negation ("no ...", "without ...", "negative for ...") covers the rest of its clause, up to
    '.', ';' or "but"; it sets a diagnosis to absent (grade 0 / False). Negated lesions and
    defects are simply not reported;
  * a diagnosis named without a grade ("NPDR", "hypertensive retinopathy", "AMD") leaves the
    grade unknown rather than guessing one;
  * keywords are read from a "Keywords: a, b." sentence, as written, and are not parsed for
    diagnoses (they are the dataset's own words, kept apart from graded fields).
"""

from __future__ import annotations

import re

from fundax.data import labels as labels_lib

# American -> British spelling, applied to lowercased text before any matching.
_SPELLING = (
    (r"(?<!o)edema", "oedema"),
    (r"(?<!a)hemorrhag", "haemorrhag"),
    (r"center(?:ed)?\b", lambda m: "centred" if m.group().endswith("ed") else "centre"),
    (r"artifact", "artefact"),
    (r"\bcolor", "colour"),
    # Collapse the DR names to the abbreviations so severity words sit next to them.
    (r"non[- ]?proliferative (?:diabetic retinopathy|dr\b|retinopathy)", "npdr"),
    (r"proliferative (?:diabetic retinopathy|dr\b|retinopathy)", "pdr"),
)
_KEYWORDS = re.compile(r"\bkeywords?\s*:\s*([^.;]*)", re.IGNORECASE)
_CLAUSE_SPLIT = re.compile(r"[.;\n]|\b(?:but|however|although|whereas)\b")
_NEGATION = re.compile(r"\b(?:no|without|not|negative for|free of|absence of)\b")

_RIGHT = re.compile(r"\bright\b|\bod\b|oculus dexter")
_LEFT = re.compile(r"\bleft\b|\bos\b|oculus sinister")
_FIELDS = {
    "macula": re.compile(
        r"macular?[- ]?centred|fovea[- ]?centred|centred on the (?:macula|fovea)"),
    "disc": re.compile(r"disc[- ]?centred|centred on the (?:optic )?disc"),
}
_QUALITIES = {
    "good": re.compile(r"\b(?:good|high|excellent)[- ]quality\b|\bquality:? (?:is )?good\b"),
    "usable": re.compile(r"\b(?:usable|acceptable|adequate|fair)[- ]quality\b"
                         r"|\bquality:? (?:is )?usable\b"),
    "reject": re.compile(r"\bungrade?able\b|\b(?:reject(?:ed)?|poor|unusable|bad)[- ]quality\b"
                         r"|\bquality:? (?:is )?(?:reject|poor)\b"),
}
_PIGMENTATIONS = {
    "light": re.compile(r"\blight(?:ly)?[- ]pigment|\blight (?:tessellated )?fundus"
                        r"|tess?ell?ated|\bblond"),
    "medium": re.compile(r"\bmoderately pigmented|\bmedium (?:fundus )?pigment|\bmedium fundus"),
    "dark": re.compile(r"\bdark(?:ly)?[- ]pigment|\bdark fundus|\bheavily pigmented"),
}
_DEFECTS = {
    "defocus": re.compile(r"defocus|out of focus|\bblurr?(?:ed|y)?\b"),
    "uneven_illumination": re.compile(r"uneven (?:illumination|lighting)"),
    "underexposure": re.compile(r"under[- ]?expos"),
    "overexposure": re.compile(r"over[- ]?expos"),
    "eyelash_artifact": re.compile(r"eyelash"),
    "dust_artifact": re.compile(r"\bdust\b"),
    "off_centre": re.compile(r"off[- ]?centre|\bdecentred"),
}
_FINDINGS = {
    "microaneurysms": re.compile(r"micro-?aneurysm"),
    "dot_blot_haemorrhages": re.compile(
        r"\b(?:dot|blot)(?:[- ]?(?:and[- ])?blot)? haemorrhage|intra-?retinal haemorrhage"),
    "flame_haemorrhages": re.compile(r"flame(?:[- ]shaped)? haemorrhage|splinter haemorrhage"),
    "hard_exudates": re.compile(r"hard exudate|(?<!soft )\bexudates?\b"),
    "cotton_wool_spots": re.compile(r"cotton[- ]?wool|soft exudate"),
    "venous_beading": re.compile(r"venous beading|beaded veins"),
    "irma": re.compile(r"\birma\b|intra-?retinal microvascular"),
    "neovascularisation": re.compile(r"neovasculari[sz]ation|new vessels|\bnv[de]\b"),
    "drusen": re.compile(r"\bdrusen\b|\bdruse\b"),
    "pigment_change": re.compile(
        r"pigment(?:ary)? (?:change|abnormalit|clump)|\bhyper-?pigmentation|\bhypo-?pigmentation"),
    "geographic_atrophy": re.compile(r"geographic atrophy"),
    "arteriolar_narrowing": re.compile(
        r"arteriolar (?:narrowing|attenuation)|narrow(?:ed|ing of the)? arterioles"),
    "av_nicking": re.compile(r"\ba-?v nicking|arterio-?venous nicking|\bav nipping"),
    "papilloedema": re.compile(r"papill?oedema|disc (?:swelling|oedema)|swollen (?:optic )?disc"),
    "disc_haemorrhage": re.compile(r"disc haemorrhage|drance haemorrhage"),
}

_DR_SEVERITY = re.compile(r"\b(mild|moderate|severe)\s+(?:npdr|diabetic retinopathy|dr)\b")
_DR_NUMBER = re.compile(r"\b(?:icdr|dr)(?: grade)?\s*([0-4])\b")
_PDR = re.compile(r"\bpdr\b")
_DR_MENTION = re.compile(r"(?<!hypertensive )\bretinopathy\b|\b(?:dr|npdr|pdr)\b")
_DME = re.compile(r"macular oedema|\bdme\b|\bcsme\b")
_GLAUCOMA = re.compile(r"glaucom")
_AMD_NAME = r"(?:amd|armd|age[- ]related macular degeneration)\b"
_AMD_STAGE_WORD = re.compile(
    r"\b(early|intermediate|late|advanced|wet|neovascular|exudative)\s+" + _AMD_NAME)
_AMD_STAGE_NUMBER = re.compile(_AMD_NAME + r"\s*\(?(?:areds\s*)?stage\s*([0-3])\b")
_AMD_MENTION = re.compile(r"\b" + _AMD_NAME + r"|macular degeneration")
_AMD_STAGES = {"early": 1, "intermediate": 2, "late": 3, "advanced": 3, "wet": 3,
               "neovascular": 3, "exudative": 3}
_ROMAN = r"([1-4]|iv|iii|ii|i)\b"
_HR_GRADE = (
    re.compile(r"grade\s*" + _ROMAN + r"\s*hypertensive retinopathy"),
    re.compile(r"hypertensive retinopathy[,:]?\s*\(?(?:kwb\s*)?(?:grade\s*)?" + _ROMAN),
)
_HR_MENTION = re.compile(r"\bhypertensive\b")
_CDR = re.compile(r"(?:cup[- /]?(?:to[- ]?)?disc(?: ratio)?|\bc/d(?: ratio)?|\bv?cdr\b)[\s:=~]*"
                  r"(?:(?:of|is|about|approximately|around)\s+)*(\d*\.\d+|\d+)")


def _normalise(text: str) -> str:
  text = " ".join(text.lower().split())
  for pattern, repl in _SPELLING:
    text = re.sub(pattern, repl, text)
  return text


def _split_negations(text: str) -> tuple[str, str]:
  """Splits text into what is asserted and what is negated (clause tails after a cue)."""
  positive, negated = [], []
  for clause in _CLAUSE_SPLIT.split(text):
    cue = _NEGATION.search(clause)
    if cue:
      positive.append(clause[:cue.start()])
      negated.append(clause[cue.end():])
    else:
      positive.append(clause)
  return " | ".join(positive), " | ".join(negated)


def _one_of(patterns: dict[str, re.Pattern], text: str) -> str | None:
  # Ambiguous text (two different values named) is treated as not stated.
  hits = [name for name, pattern in patterns.items() if pattern.search(text)]
  return hits[0] if len(hits) == 1 else None


def _laterality(text: str) -> str | None:
  right, left = bool(_RIGHT.search(text)), bool(_LEFT.search(text))
  if right != left:
    return "right" if right else "left"
  return None


def _roman(token: str) -> int:
  return {"i": 1, "ii": 2, "iii": 3, "iv": 4}.get(token) or int(token)


def _dr_grade(positive: str, negated: str) -> int | None:
  if m := _DR_SEVERITY.search(positive):
    return ("mild", "moderate", "severe").index(m.group(1)) + 1
  if _PDR.search(positive):
    return 4
  if m := _DR_NUMBER.search(positive):
    return int(m.group(1))
  return 0 if _DR_MENTION.search(negated) else None


def _amd_stage(positive: str, negated: str) -> int | None:
  if m := _AMD_STAGE_WORD.search(positive):
    return _AMD_STAGES[m.group(1)]
  if m := _AMD_STAGE_NUMBER.search(positive):
    return int(m.group(1))
  return 0 if _AMD_MENTION.search(negated) else None


def _hypertensive_grade(positive: str, negated: str) -> int | None:
  for pattern in _HR_GRADE:
    if m := pattern.search(positive):
      return _roman(m.group(1))
  return 0 if _HR_MENTION.search(negated) else None


def _flag(pattern: re.Pattern, positive: str, negated: str) -> bool | None:
  if pattern.search(positive):
    return True
  return False if pattern.search(negated) else None


def _cdr(text: str) -> float | None:
  m = _CDR.search(text)
  if not m:
    return None
  value = float(m.group(1))
  return value if 0.0 <= value <= 1.0 else None  # "CDR 7" is not a ratio; leave it unknown


def parse_caption(text: str) -> labels_lib.FundusLabels:
  """Recovers the facts stated in a caption or free-form prompt.

  Args:
    text: a caption from `captions.caption` or any clinical description of a fundus image.

  Returns:
    A `FundusLabels` with the stated fields set and the rest `None`. `findings` maps each
    lesion mentioned as present to 1 (presence only, see the module docstring).

  Raises:
    TypeError: `text` is not a `str`.
  """
  if not isinstance(text, str):
    raise TypeError(f"parse_caption() needs a str, got {type(text).__name__}")
  keywords = None
  if m := _KEYWORDS.search(text):
    keywords = tuple(k.strip() for k in m.group(1).split(",") if k.strip()) or None
    text = text[:m.start()] + text[m.end():]
  text = _normalise(text)
  positive, negated = _split_negations(text)
  findings = {name: 1 for name, pattern in _FINDINGS.items() if pattern.search(positive)}
  defects = tuple(name for name, pattern in _DEFECTS.items() if pattern.search(positive))
  return labels_lib.FundusLabels(
      laterality=_laterality(text),
      field=_one_of(_FIELDS, text),
      quality=_one_of(_QUALITIES, text),
      dr_grade=_dr_grade(positive, negated),
      dme=_flag(_DME, positive, negated),
      cdr=_cdr(text),
      glaucoma=_flag(_GLAUCOMA, positive, negated),
      amd_stage=_amd_stage(positive, negated),
      hypertensive_grade=_hypertensive_grade(positive, negated),
      pigmentation=_one_of(_PIGMENTATIONS, text),
      findings=findings or None,
      quality_defects=defects or None,
      keywords=keywords,
  )
