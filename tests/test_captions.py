"""Captions: exact wording, facts-only, flips, length bound, and the parser round trip."""

import dataclasses
import re

import numpy as np
import pytest

from fundax.data import captions
from fundax.data import labels as labels_lib
from fundax.data.labels import FundusLabels

ODIR_KEYWORDS = ("normal fundus", "cataract", "drusen", "glaucoma", "hypertensive retinopathy",
                 "pathological myopia", "laser spot", "moderate non proliferative retinopathy",
                 "lens dust", "macular epiretinal membrane")


def random_labels(rng: np.random.Generator) -> FundusLabels:
  """A random record; each field is None (unknown) with probability 0.3."""

  def maybe(value):
    return None if rng.random() < 0.3 else value

  def subset(names, p):
    return tuple(n for n in names if rng.random() < p)

  findings = {n: int(rng.choice([0, 1, 3, 8, 25])) for n in subset(labels_lib.FINDINGS, 0.3)}
  return FundusLabels(
      laterality=maybe(str(rng.choice(labels_lib.LATERALITIES))),
      field=maybe(str(rng.choice(labels_lib.FIELDS))),
      quality=maybe(str(rng.choice(labels_lib.QUALITIES))),
      dr_grade=maybe(int(rng.integers(5))),
      dme=maybe(bool(rng.integers(2))),
      cdr=maybe(float(rng.uniform(0.0, 1.0))),
      glaucoma=maybe(bool(rng.integers(2))),
      amd_stage=maybe(int(rng.integers(4))),
      hypertensive_grade=maybe(int(rng.integers(5))),
      pigmentation=maybe(str(rng.choice(labels_lib.PIGMENTATIONS))),
      findings=maybe(findings),
      quality_defects=maybe(subset(labels_lib.QUALITY_DEFECTS, 0.3)),
      keywords=maybe(subset(ODIR_KEYWORDS, 0.2)),
  )


def stated(labels: FundusLabels) -> FundusLabels:
  """What a caption of `labels` states, i.e. what parse_caption must give back."""
  present = {n: 1 for n, c in (labels.findings or {}).items() if c > 0}
  defects = tuple(d for d in labels_lib.QUALITY_DEFECTS if d in (labels.quality_defects or ()))
  return FundusLabels(
      laterality=labels.laterality, field=labels.field, quality=labels.quality,
      dr_grade=labels.dr_grade, dme=labels.dme,
      cdr=None if labels.cdr is None else float(captions.format_cdr(labels.cdr)),
      glaucoma=labels.glaucoma, amd_stage=labels.amd_stage,
      hypertensive_grade=labels.hypertensive_grade, pigmentation=labels.pigmentation,
      findings=present or None, quality_defects=defects or None,
      keywords=labels.keywords or None)


def full_record(**overrides) -> FundusLabels:
  """Everything known and present: the worst case for caption length."""
  fields = dict(
      laterality="left", field="disc", quality="usable", dr_grade=4, dme=True, cdr=0.65,
      glaucoma=True, amd_stage=2, hypertensive_grade=4, pigmentation="light",
      findings={n: 30 for n in labels_lib.FINDINGS},
      quality_defects=("defocus", "uneven_illumination", "eyelash_artifact"),
      keywords=("cataract", "lens dust"))
  fields.update(overrides)
  return FundusLabels(**fields)


def test_exact_caption_style0():
  labels = FundusLabels(
      laterality="right", field="macula", quality="usable", dr_grade=2, dme=False, cdr=0.3,
      glaucoma=False, amd_stage=1, pigmentation="medium",
      findings={"microaneurysms": 8, "dot_blot_haemorrhages": 7, "hard_exudates": 3,
                "drusen": 2, "cotton_wool_spots": 0},
      quality_defects=("uneven_illumination",), keywords=("cataract",))
  assert captions.caption(labels) == (
      "Colour fundus photograph of the right eye, macula-centred, usable quality with uneven "
      "illumination. Moderately pigmented fundus. Moderate non-proliferative diabetic "
      "retinopathy with scattered microaneurysms, dot-blot haemorrhages and a few hard "
      "exudates. Early AMD with a few medium drusen. Cup-to-disc ratio 0.3. No macular oedema "
      "or glaucoma. Keywords: cataract.")


def test_exact_caption_terse_style():
  labels = FundusLabels(laterality="left", field="disc", quality="good", dr_grade=4, dme=True,
                        cdr=0.75, hypertensive_grade=2,
                        findings={"neovascularisation": 1, "av_nicking": 1})
  assert captions.caption(labels, 1) == (
      "OS, disc-centred, good quality. PDR: neovascularisation. DME. Grade 2 hypertensive "
      "retinopathy: AV nicking. CDR 0.75.")


@pytest.mark.parametrize("style", range(captions.NUM_STYLES))
def test_round_trip_random_records(style):
  rng = np.random.default_rng([7, style])
  for _ in range(300):
    labels = random_labels(rng)
    text = captions.caption(labels, style)
    assert captions.parse_caption(text) == stated(labels), text


def test_captions_are_deterministic_and_all_styles_differ():
  labels = full_record()
  assert captions.captions(labels) == captions.captions(labels)
  assert len(set(captions.captions(labels))) == captions.NUM_STYLES
  rng = np.random.default_rng(0)
  assert captions.random_caption(labels, rng) in captions.captions(labels)


def _swap_sides(text):
  swap = {"right": "left", "left": "right", "OD": "OS", "OS": "OD"}
  return re.sub(r"\b(right|left|OD|OS)\b", lambda m: swap[m.group()], text)


@pytest.mark.parametrize("style", range(captions.NUM_STYLES))
def test_flip_changes_only_laterality(style):
  rng = np.random.default_rng([11, style])
  for _ in range(50):
    labels = random_labels(rng)
    labels = dataclasses.replace(labels, laterality=labels.laterality or "right")
    plain, flipped = captions.caption(labels, style), captions.caption(labels.flipped(), style)
    assert plain != flipped
    assert flipped == _swap_sides(plain)
    assert captions.parse_caption(flipped).laterality == labels.flipped().laterality


def test_unknown_fields_are_not_mentioned():
  for style in range(captions.NUM_STYLES):
    text = captions.caption(FundusLabels(dr_grade=2), style).lower()
    assert "moderate" in text
    for word in ("right", "left", "od", "os", "eye,", "quality", "cup", "cdr", "centred",
                 "oedema", "dme", "glaucom", "amd", "hypertensive", "pigment", "no "):
      assert not re.search(rf"\b{re.escape(word)}", text), (word, text)
    assert captions.parse_caption(text) == FundusLabels(dr_grade=2)


def test_negatives_only_when_known():
  grade0 = captions.captions(FundusLabels(dr_grade=0, dme=False))
  assert "No diabetic retinopathy or macular oedema" in grade0[0]
  assert "No DR or DME" in grade0[1]
  assert all("DME" not in c and "oedema" not in c
             for c in captions.captions(FundusLabels(dr_grade=0)))
  # Findings known but empty: no lesion words, and no invented negatives.
  empty = captions.caption(FundusLabels(dr_grade=3, findings={}))
  assert empty == "Colour fundus photograph. Severe non-proliferative diabetic retinopathy."


def test_quantity_words_follow_counts():
  text = captions.caption(FundusLabels(findings={"microaneurysms": 1, "hard_exudates": 3,
                                                 "cotton_wool_spots": 40}))
  assert text == ("Colour fundus photograph. Other findings: a single microaneurysm, a few hard "
                  "exudates and numerous cotton-wool spots.")


def test_areds_and_kwb_wording():
  late = captions.caption(FundusLabels(amd_stage=3, findings={"geographic_atrophy": 1,
                                                              "drusen": 9}))
  assert "Late AMD with scattered large drusen and geographic atrophy" in late
  hr = captions.caption(FundusLabels(hypertensive_grade=3, findings={
      "arteriolar_narrowing": 1, "flame_haemorrhages": 2, "cotton_wool_spots": 2}))
  assert ("KWB grade 3 hypertensive retinopathy with a few flame haemorrhages, cotton-wool "
          "spots and arteriolar narrowing") in hr


@pytest.mark.parametrize("style", range(captions.NUM_STYLES))
def test_worst_case_length(style):
  assert len(captions.caption(full_record(), style).split()) < 90


def test_parses_free_form_prompts():
  parse = captions.parse_caption
  got = parse("Left eye with severe NPDR, no DME, cup to disc ratio of 0.7")
  assert (got.laterality, got.dr_grade, got.dme, got.cdr) == ("left", 3, False, 0.7)
  got = parse("os fundus, proliferative diabetic retinopathy with new vessels and hemorrhages")
  assert (got.laterality, got.dr_grade, got.findings) == ("left", 4, {"neovascularisation": 1})
  assert parse("late AMD, cup/disc 0.8").cdr == 0.8
  got = parse("RIGHT EYE. PDR. Cup-disc ratio 0.7. Macular edema. Glaucoma.")
  assert (got.laterality, got.dr_grade, got.cdr, got.dme, got.glaucoma) == (
      "right", 4, 0.7, True, True)
  got = parse("a macula-centered photo, mild diabetic retinopathy, without glaucoma or AMD")
  assert (got.field, got.dr_grade, got.glaucoma, got.amd_stage) == ("macula", 1, False, 0)
  got = parse("grade II hypertensive retinopathy with AV nicking, blurry, tessellated fundus")
  assert (got.hypertensive_grade, got.findings, got.quality_defects, got.pigmentation) == (
      2, {"av_nicking": 1}, ("defocus",), "light")
  # A diagnosis without a grade leaves the grade unknown rather than guessed.
  got = parse("NPDR and hypertensive retinopathy")
  assert got == FundusLabels()


def test_bad_input():
  with pytest.raises(TypeError):
    captions.caption({"dr_grade": 2})
  with pytest.raises(TypeError):
    captions.parse_caption(None)
  with pytest.raises(ValueError):
    captions.caption(FundusLabels(), captions.NUM_STYLES)
