"""Anatomy detectors against the phantom's masks and geometry, with negative controls.

Small sets at 64 px: these check that the machinery measures what it claims; the headline
figures (300 images per resolution, raw and FOV-cropped) are in bench/results/detectors_*.json.
"""

import numpy as np
import pytest
from scipy import ndimage

from fundax.data import captions
from fundax.data import phantom
from fundax.data import pipeline
from fundax.eval import anatomy_checks

SEEDS = range(500_000, 500_016)  # a mixed case mix: both eyes, both fields, some defects


@pytest.fixture(scope="module")
def samples():
  return [phantom.generate(seed, 64) for seed in SEEDS]


def _px(point, resolution=64):
  return (np.asarray(point) + 1.0) * resolution / 2  # normalised -> pixels (raster.to_px)


def _true_radius(sample):
  return np.sqrt(sample.masks["disc"].sum() / np.pi)


def _blur(image, sigma=1.5):
  return np.round(ndimage.gaussian_filter(image.astype(np.float64), (sigma, sigma, 0))).astype(
      np.uint8)


def test_disc_found_where_the_phantom_drew_it(samples):
  errors, radius_errors = [], []
  for s in samples:
    disc = anatomy_checks.detect_disc(s.image)
    assert disc.found
    errors.append(np.hypot(*(np.array([disc.x, disc.y]) - _px(s.record["geometry"]["disc"]))) /
                  _true_radius(s))
    radius_errors.append(abs(disc.radius / _true_radius(s) - 1))
  assert np.mean(np.array(errors) <= 0.5) >= 0.9
  assert np.median(radius_errors) < 0.25


def test_disc_found_in_the_pipelines_fov_crop(samples):
  hits = []
  for s in samples[:8]:
    image = pipeline.resize(pipeline.crop_to_fov(s.image), 64)
    top, left, bottom, right = pipeline.fov_bbox(s.image)
    side = max(bottom - top, right - left)
    corner = np.array([(left + right - side) // 2, (top + bottom - side) // 2])
    truth = (_px(s.record["geometry"]["disc"]) - corner) * 64 / side
    disc = anatomy_checks.detect_disc(image)
    hits.append(np.hypot(disc.x - truth[0], disc.y - truth[1]) <= 0.5 * _true_radius(s))
  assert np.mean(hits) >= 7 / 8


def test_fovea_found_beside_the_disc(samples):
  hits = []
  for s in samples:
    fovea = anatomy_checks.detect_fovea(s.image)
    truth = _px(s.record["geometry"]["fovea"])
    hits.append(fovea is not None and np.hypot(*(np.array(fovea) - truth)) <= _true_radius(s))
  assert np.mean(hits) >= 0.8


def test_fov_mask_matches_the_phantoms(samples):
  for s in samples[:4]:
    found, truth = anatomy_checks.fov_mask(s.image), s.masks["fov"]
    assert (found & truth).sum() / (found | truth).sum() > 0.95


def test_vessel_centre_lines_lie_on_the_drawn_vessels(samples):
  on, on_other = [], []
  for s, other in zip(samples, samples[1:] + samples[:1]):
    lines = anatomy_checks.vessel_map(s.image)
    on.append((lines & ndimage.binary_dilation(s.masks["vessels"])).sum() / lines.sum())
    on_other.append((lines & ndimage.binary_dilation(other.masks["vessels"])).sum() / lines.sum())
  # measured 0.93 on the eye's own vessels, 0.51 on another eye's (dilated masks cover much)
  assert np.mean(on) > 0.8
  assert np.mean(on) > 1.5 * np.mean(on_other)


def test_vessel_fraction_tracks_the_mask_and_drops_when_blurred(samples):
  ratio, blurred = [], []
  for s in samples:
    truth = s.masks["vessels"].sum() / s.masks["fov"].sum()
    ratio.append(anatomy_checks.vessel_fraction(s.image) / truth)
    blurred.append(anatomy_checks.vessel_fraction(_blur(s.image)) / truth)
  assert 0.8 <= np.mean(ratio) <= 1.2  # measured 1.04
  assert np.mean(blurred) < 0.5 * np.mean(ratio)  # measured 0.01


def test_vessel_ratio_is_relative_to_the_reference(samples):
  images = np.stack([s.image for s in samples[:6]])
  same = anatomy_checks.vessel_ratio(images, images)
  assert same["ratio"] == pytest.approx(1.0)
  assert set(same) == {"generated_mean", "reference_mean", "ratio", "generated", "reference"}
  assert len(same["generated"]) == 6
  blurred = anatomy_checks.vessel_ratio(np.stack([_blur(x) for x in images]), images)
  assert blurred["ratio"] < 0.5


def test_float_images_give_the_same_answers(samples):
  image = samples[0].image
  as_float = image.astype(np.float32) / 127.5 - 1
  assert anatomy_checks.detect_disc(as_float) == pytest.approx(anatomy_checks.detect_disc(image))
  assert anatomy_checks.vessel_fraction(as_float) == pytest.approx(
      anatomy_checks.vessel_fraction(image))


def _circle(size=64):
  yy, xx = np.mgrid[:size, :size] + 0.5
  return np.hypot(xx - size / 2, yy - size / 2) <= 0.95 * size / 2


@pytest.mark.parametrize("sigma", [2.0, 3.0])
def test_smooth_noise_has_no_vessels_and_no_disc(sigma):
  for seed in range(4):
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal((64, 64, 3)),
                                    (sigma, sigma, 0))
    blotchy = np.array([0.9, 0.45, 0.3]) * (1 + 0.1 * noise / noise.std())
    image = np.round(np.clip(blotchy, 0, 1) * 255 * _circle()[..., None]).astype(np.uint8)
    assert anatomy_checks.vessel_fraction(image) < 0.02
    assert not anatomy_checks.detect_disc(image).found
    assert anatomy_checks.disc_side(image) is None


def test_a_vessel_free_fundus_has_no_vessels(samples):
  sample = samples[0]
  fov = sample.masks["fov"]
  # a smooth orange disc with the same field of view and the eye's mean colour
  blank = np.where(fov[..., None], sample.image[fov].mean(0), 0).astype(np.uint8)
  assert anatomy_checks.vessel_fraction(blank) < 0.005
  assert anatomy_checks.vessel_fraction(sample.image) > 0.1


@pytest.mark.parametrize("laterality", ["right", "left"])
def test_disc_side_follows_laterality(laterality):
  samples = [phantom.generate(s, 64, laterality=laterality, field="macula") for s in range(4)]
  images = np.stack([s.image for s in samples])
  prompts = [captions.caption(s.labels) for s in samples]
  assert all(anatomy_checks.disc_side(x) == laterality for x in images)
  agree = anatomy_checks.disc_side_agreement(images, prompts)
  assert agree["n"] == agree["n_macula"] == 4 and agree["n_disc"] == 0
  assert agree["accuracy"] == agree["accuracy_macula"] == 1.0
  assert np.isnan(agree["accuracy_disc"])
  # mirrored photographs show the other eye
  assert anatomy_checks.disc_side_agreement(images[:, :, ::-1], prompts)["accuracy"] == 0.0


def test_disc_centred_prompts_are_scored_by_the_fovea():
  samples = [phantom.generate(s, 64, laterality=lat, field="disc")
             for s in range(3) for lat in ("right", "left")]
  images = np.stack([s.image for s in samples])
  prompts = [captions.caption(s.labels) for s in samples]
  agree = anatomy_checks.disc_side_agreement(images, prompts)
  assert agree["n"] == agree["n_disc"] == 6 and agree["n_macula"] == 0
  assert agree["accuracy_disc"] >= 5 / 6
  assert anatomy_checks.disc_side_agreement(images[:, :, ::-1], prompts)["accuracy"] <= 1 / 6


def test_agreement_skips_prompts_without_laterality_or_field():
  image = phantom.generate(0, 64, laterality="right", field="macula").image
  prompts = ["Colour fundus photograph.", "Colour fundus photograph of the right eye.",
             "Colour fundus photograph of the right eye, macula-centred."]
  agree = anatomy_checks.disc_side_agreement(np.stack([image] * 3), prompts)
  assert agree["n"] == agree["n_macula"] == 1


def test_measure_reports_every_detector(samples):
  m = anatomy_checks.measure(samples[0].image)
  assert m["disc_found"] and m["disc_contrast"] > 1.2  # the disc is much brighter
  assert m["disc_side"] == samples[0].labels.laterality or samples[0].labels.field == "disc"
  assert 0.05 < m["vessel_fraction"] < 0.4
  assert np.isfinite([m["disc_x"], m["disc_y"], m["disc_radius"], m["fovea_x"],
                      m["fovea_y"]]).all()
