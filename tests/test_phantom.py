"""Tests of the procedural fundus world (fundax.data.phantom): determinism, geometry, labels
against pixels, pathology, quality defects and input checking."""

import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage
from skimage import morphology

from fundax.data import labels as labels_lib
from fundax.data import phantom
from fundax.data.phantom.lesions import MASK_OF

NORMAL = dict(dr_grade=0, amd_stage=0, hypertensive_grade=0, glaucoma=False, quality="good")


def _centre(mask):
  """Centre of a mask in normalised coordinates (x, y)."""
  ys, xs = np.nonzero(mask)
  n = mask.shape[0]
  return np.array([(xs.mean() + 0.5) * 2 / n - 1, (ys.mean() + 0.5) * 2 / n - 1])


def test_same_seed_same_image_and_different_seeds_differ():
  a = phantom.generate(3, 96)
  b = phantom.generate(3, 96)
  c = phantom.generate(4, 96)
  np.testing.assert_array_equal(a.image, b.image)
  for name in phantom.MASK_NAMES:
    np.testing.assert_array_equal(a.masks[name], b.masks[name])
  assert a.record == b.record
  assert np.abs(a.image.astype(int) - c.image.astype(int)).mean() > 5


def test_outputs_have_documented_types_and_masks():
  s = phantom.generate(5, 128, dr_grade=2)
  assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
  assert set(s.masks) == set(phantom.MASK_NAMES)
  for name, m in s.masks.items():
    assert m.shape == (128, 128) and m.dtype == bool, name
  assert isinstance(s.labels, labels_lib.FundusLabels)
  assert all(getattr(s.labels, f.name) is not None for f in dataclasses.fields(s.labels)
             if f.name != "keywords")
  # the record survives JSON and carries the labels
  record = json.loads(json.dumps(s.record))
  assert labels_lib.FundusLabels.from_dict(record["labels"]) == s.labels
  # outside the field of view (past its anti-aliased edge) the photograph is black
  assert s.image[~ndimage.binary_dilation(s.masks["fov"])].max() <= 10
  assert (s.masks["vessels"] == (s.masks["arteries"] | s.masks["veins"])).all()


def test_resolution_independence():
  case = phantom.sample_case(np.random.default_rng(11), **NORMAL)
  lo = phantom.render(case, 128)
  hi = phantom.render(case, 256)
  down = hi.image.astype(float).reshape(128, 2, 128, 2, 3).mean((1, 3))
  assert np.abs(down - lo.image).mean() < 5.0  # of 255; mostly the one-pixel vessel edges
  np.testing.assert_allclose(_centre(lo.masks["disc"]), _centre(hi.masks["disc"]), atol=0.02)
  vessels_down = hi.masks["vessels"].reshape(128, 2, 128, 2).any((1, 3))
  overlap = (vessels_down & lo.masks["vessels"]).sum() / lo.masks["vessels"].sum()
  assert overlap > 0.8


@pytest.mark.parametrize("resolution", [64, 1024])
def test_extreme_resolutions(resolution):
  s = phantom.generate(2, resolution, dr_grade=1)
  assert s.image.shape == (resolution, resolution, 3)
  assert s.masks["disc"].any() and s.masks["vessels"].any()
  assert s.masks["microaneurysms"].any()  # sub-pixel lesions still cover a pixel


@pytest.mark.parametrize("laterality", ["left", "right"])
@pytest.mark.parametrize("field", ["macula", "disc"])
def test_disc_side_and_field(laterality, field):
  s = phantom.generate(7, 128, laterality=laterality, field=field, quality="good")
  disc = _centre(s.masks["disc"])
  geo = s.record["geometry"]
  fovea = np.asarray(geo["fovea"])
  # a right eye shows its disc (the nasal side) on the right of the image
  assert (disc[0] > fovea[0]) == (laterality == "right")
  if field == "macula":
    assert np.hypot(*fovea) < 0.15 and abs(disc[0]) > 0.3
  else:
    assert np.hypot(*disc) < 0.15 and abs(fovea[0]) > 0.3
  # fovea about 2.5 disc diameters from the disc centre
  assert 2.2 < np.hypot(*(disc - fovea)) / geo["disc_diameter"] < 2.8


def test_fovea_is_darkest_spot_of_the_macula():
  s = phantom.generate(8, 256, **NORMAL, pigmentation="medium")
  g = ndimage.uniform_filter(s.image[..., 1].astype(float), 9)
  # darkest smoothed green away from vessels and the field edge
  fov = ndimage.binary_erosion(s.masks["fov"], iterations=25)
  vessel_free = ~ndimage.binary_dilation(s.masks["vessels"], iterations=4)
  y, x = np.unravel_index(np.argmin(np.where(fov & vessel_free, g, 1e9)), g.shape)
  found = np.array([(x + 0.5) / 128 - 1, (y + 0.5) / 128 - 1])
  geo = s.record["geometry"]
  assert np.hypot(*(found - geo["fovea"])) < 0.5 * geo["disc_diameter"]


def test_normal_eye_has_no_lesions():
  for seed in range(3):
    s = phantom.generate(seed, 128, **NORMAL)
    assert not s.masks["lesions"].any()
    assert sum(s.labels.findings.values()) == 0 and s.labels.dme is False


def test_grade_4_has_new_vessels_and_counts_match_drawn():
  s = phantom.generate(1, 256, dr_grade=4)
  assert s.labels.findings["neovascularisation"] >= 1
  assert s.masks["neovascularisation"].sum() > 5
  lesions = s.record["lesions"]
  for finding, mask in MASK_OF.items():
    count = s.labels.findings[finding]
    if finding in lesions:
      assert count == len(lesions[finding]["x"]), finding
    # a finding is drawn exactly when it is counted
    assert (count > 0) == s.masks[mask].any() or mask == "haemorrhages", finding
  # every microaneurysm's centre pixel is in the microaneurysm mask
  ma = lesions["microaneurysms"]
  cols = ((np.asarray(ma["x"]) + 1) * 128).astype(int)
  rows = ((np.asarray(ma["y"]) + 1) * 128).astype(int)
  assert s.masks["microaneurysms"][rows, cols].all()


@pytest.mark.parametrize("grade,expect", [(1, {"microaneurysms"}),
                                          (3, {"venous_beading", "irma"})])
def test_dr_grades_follow_icdr(grade, expect):
  f = phantom.generate(12, 64, dr_grade=grade, amd_stage=0, hypertensive_grade=0,
                       glaucoma=False).labels.findings
  assert all(f[k] > 0 for k in expect)
  if grade == 1:  # mild NPDR: microaneurysms only
    assert sum(f.values()) == f["microaneurysms"]
  if grade == 3:  # 4-2-1 rule: more than 20 haemorrhages in each quadrant
    assert f["dot_blot_haemorrhages"] > 80 and f["neovascularisation"] == 0


def test_haemorrhages_darker_and_exudates_yellower_than_surround():
  s = phantom.generate(21, 384, dr_grade=3, dme=True, quality="good", amd_stage=0,
                       hypertensive_grade=0)
  img = s.image.astype(float)
  haem = s.masks["haemorrhages"] & ~s.masks["vessels"]
  ring = ndimage.binary_dilation(s.masks["lesions"] | s.masks["vessels"], iterations=3)
  ring = ndimage.binary_dilation(haem, iterations=6) & ~ring & s.masks["fov"]
  assert img[haem][:, 1].mean() < 0.8 * img[ring][:, 1].mean()  # darker in green
  ex = s.masks["exudates"] & ~s.masks["vessels"] & ~s.masks["haemorrhages"]
  assert ex.sum() > 0
  ring = ndimage.binary_dilation(ex, iterations=5) & ~ndimage.binary_dilation(
      s.masks["lesions"] | s.masks["vessels"], iterations=2) & s.masks["fov"]
  assert img[ex][:, 1].mean() > 1.2 * img[ring][:, 1].mean()  # exudates are yellow: more green


def test_dme_label_follows_exudate_positions():
  for seed in range(6):
    s = phantom.generate(seed, 64, dr_grade=3)
    ex = s.record["lesions"]["hard_exudates"]
    geo = s.record["geometry"]
    d = np.hypot(np.asarray(ex["x"]) - geo["fovea"][0], np.asarray(ex["y"]) - geo["fovea"][1])
    assert s.labels.dme == bool((d <= geo["disc_diameter"]).any())
  assert phantom.generate(0, 64, dme=True).labels.dme is True
  assert phantom.generate(0, 64, dr_grade=3, dme=False).labels.dme is False


def _zone_b_width(sample, vessel):
  """Mean vessel width (pixels) in the clinical AVR measuring zone, 1-1.5 DD from the disc
  centre (0.5-1 DD from its margin), where only the main vessels run."""
  mask = sample.masks[vessel]
  n = mask.shape[0]
  geo = sample.record["geometry"]
  yy, xx = (np.mgrid[:n, :n] + 0.5) * 2 / n - 1
  d = np.hypot(xx - geo["disc"][0], yy - geo["disc"][1]) / geo["disc_diameter"]
  skeleton = morphology.skeletonize(mask) & (d > 1.0) & (d < 1.5)
  # a line k pixels wide has distance (k + 1) / 2 to the background at its centre
  return (2 * ndimage.distance_transform_edt(mask)[skeleton] - 1).mean()


def test_arteries_narrower_than_veins_and_narrowed_in_hypertension():
  ratios = []
  for grade in (0, 1):
    s = phantom.generate(4, 512, **(NORMAL | dict(hypertensive_grade=grade)))
    ratios.append(_zone_b_width(s, "arteries") / _zone_b_width(s, "veins"))
  assert s.labels.findings["arteriolar_narrowing"] == 1
  assert 0.5 < ratios[0] < 0.85  # a healthy arteriolar-to-venular ratio is about 0.7
  assert ratios[1] < 0.85 * ratios[0]
  assert s.record["params"]["artery_radius"] < 0.55 * s.record["params"]["vein_radius"]


def test_vessel_opacity_keeps_the_calibre_the_masks_lose():
  """At 64 px a narrowed artery is still drawn a pixel wide in the mask; its opacity (what
  darkens the image) keeps the narrowing, and is drawn only where the image shows vessels."""
  opacity_ratio, mask_ratio = [], []
  for grade in (0, 1):
    s = phantom.generate(4, 64, **(NORMAL | dict(hypertensive_grade=grade)))
    op = s.vessel_opacity
    assert op.shape == (64, 64, 2) and op.dtype == np.float32
    assert op.min() >= 0 and op.max() <= 1 and not op[~s.masks["fov"]].any()
    outside_disc = ~s.masks["disc"]
    assert (op[..., 0][s.masks["arteries"] & outside_disc] > 0).all()
    assert (op[..., 1][s.masks["veins"] & outside_disc] > 0).all()
    opacity_ratio.append(op[..., 0].sum() / op[..., 1].sum())
    mask_ratio.append(s.masks["arteries"].sum() / s.masks["veins"].sum())
  assert opacity_ratio[1] < 0.75 * opacity_ratio[0]
  assert mask_ratio[1] > 0.75 * mask_ratio[0]  # what the masks alone barely show


def test_geographic_atrophy_is_pale():
  s = phantom.generate(2, 256, amd_stage=3, dr_grade=0, hypertensive_grade=0, quality="good")
  ga = s.masks["atrophy"] & ~s.masks["vessels"]
  assert ga.sum() > 50
  ring = ndimage.binary_dilation(ga, iterations=8) & ~ndimage.binary_dilation(
      s.masks["lesions"] | s.masks["vessels"], iterations=2) & s.masks["fov"]
  img = s.image.astype(float)
  assert img[ga][:, 1].mean() > 1.3 * img[ring][:, 1].mean()


def test_glaucoma_cup_matches_cdr():
  for glaucoma in (False, True):
    s = phantom.generate(5, 512, glaucoma=glaucoma, hypertensive_grade=0, quality="good")
    rows_cup = np.nonzero(s.masks["cup"].any(1))[0]
    rows_disc = np.nonzero(s.masks["disc"].any(1))[0]
    cdr = (np.ptp(rows_cup) + 1) / (np.ptp(rows_disc) + 1)
    assert abs(cdr - s.labels.cdr) < 0.06
    assert (s.labels.cdr >= 0.65) == glaucoma


def test_papilloedema_swells_the_disc():
  normal = phantom.generate(6, 128, **NORMAL)
  swollen = phantom.generate(6, 128, dr_grade=0, amd_stage=0, hypertensive_grade=4)
  assert swollen.labels.findings["papilloedema"] == 1
  dd = [s.record["geometry"]["disc_diameter"] for s in (normal, swollen)]
  areas = [s.masks["disc"].sum() / d**2 for s, d in zip((normal, swollen), dd)]
  assert areas[1] > 1.5 * areas[0]
  assert not swollen.masks["cup"].any()


def _high_frequency_energy(image, fov):
  lap = ndimage.laplace(image[..., 1].astype(float))
  return lap[ndimage.binary_erosion(fov, iterations=3)].var()


def test_quality_defects_degrade_the_image():
  case = phantom.sample_case(np.random.default_rng(9), **NORMAL)
  clean = phantom.render(case, 128)

  def with_defect(name, severity=0.8):
    defects = {name: {"severity": severity, "angle": 0.0, "spots": [[0.2, 0.1], [-0.3, 0.4]],
                      "seed": 1}}
    return phantom.render(dataclasses.replace(case, defects=defects), 128).image

  fov = clean.masks["fov"]
  assert _high_frequency_energy(with_defect("defocus"), fov) < 0.3 * _high_frequency_energy(
      clean.image, fov)
  assert with_defect("underexposure")[fov].mean() < 0.6 * clean.image[fov].mean()
  assert with_defect("overexposure")[fov].mean() > 1.2 * clean.image[fov].mean()
  for name in ("uneven_illumination", "off_centre"):  # global: change the whole field
    diff = np.abs(with_defect(name).astype(float) - clean.image)[fov].mean()
    assert diff > 3, name
  for name in ("eyelash_artifact", "dust_artifact"):  # local: a marked change somewhere
    diff = np.abs(with_defect(name).astype(float) - clean.image).max(-1)[fov]
    assert np.percentile(diff, 99.5) > 20, name


def test_reject_quality_is_graded_from_defects():
  s = phantom.generate(3, 64, quality="reject")
  assert s.labels.quality == "reject" and s.labels.quality_defects
  sev = {k: v["severity"] for k, v in s.record["quality_defects"].items()}
  assert phantom.grade_quality(sev) == "reject"
  assert phantom.grade_quality({}) == "good"
  assert phantom.grade_quality({"defocus": 0.3}) == "usable"
  assert phantom.grade_quality({"defocus": 0.3, "dust_artifact": 0.45}) == "usable"
  assert phantom.grade_quality({"defocus": 0.45, "dust_artifact": 0.45}) == "reject"
  assert phantom.grade_quality({"defocus": 0.7}) == "reject"


def test_case_mix_and_constraints():
  rng = np.random.default_rng(0)
  cases = [phantom.sample_case(rng).labels() for _ in range(150)]
  normal = np.mean([c.dr_grade == 0 for c in cases])
  good = np.mean([c.quality == "good" for c in cases])
  assert 0.55 < normal < 0.85 and 0.6 < good < 0.9
  assert len({c.dr_grade for c in cases}) >= 4
  c = phantom.sample_case(rng, dr_grade=4, laterality="left", quality="reject").labels()
  assert (c.dr_grade, c.laterality, c.quality) == (4, "left", "reject")
  c = phantom.sample_case(rng, amd_stage=3, pigmentation="dark", field="disc").labels()
  assert (c.amd_stage, c.pigmentation, c.field) == (3, "dark", "disc")
  assert c.findings["geographic_atrophy"] > 0


@pytest.mark.parametrize("kwargs,field", [
    (dict(dr_grade=7), "dr_grade"),
    (dict(laterality="up"), "laterality"),
    (dict(colour="blue"), "colour"),
    (dict(cdr=2.0), "cdr"),
    (dict(cdr=0.3, glaucoma=True), "glaucoma"),
    (dict(quality="good", quality_defects=("defocus",)), "quality_defects"),
    (dict(quality_defects=("smudge",)), "quality_defects"),
    (dict(dme=True, dr_grade=1), "dme"),
    (dict(amd_stage=True), "amd_stage"),
])
def test_bad_constraints_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    phantom.generate(0, 64, **kwargs)


def test_bad_resolution():
  with pytest.raises(ValueError, match="resolution"):
    phantom.generate(0, 32)
