"""SSIM against scikit-image, MS-SSIM known answers, diversity grouping."""

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from fundax.eval import ssim


def _pair(seed, noise=0.3, size=48):
  rng = np.random.default_rng(seed)
  a = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  b = np.clip(a + noise * rng.normal(size=a.shape), -1, 1).astype(np.float32)
  return a, b


def test_ssim_matches_skimage():
  a, b = _pair(0)
  ours = np.asarray(ssim.ssim(a, b))
  theirs = [structural_similarity(a[i], b[i], channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=2.0) for i in range(2)]
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_ms_ssim_identical_is_one_and_noise_is_low():
  a, _ = _pair(1, size=64)
  noise = np.random.default_rng(2).uniform(-1, 1, a.shape).astype(np.float32)
  np.testing.assert_allclose(ssim.ms_ssim(a, a), 1.0, atol=1e-5)
  assert np.all(np.asarray(ssim.ms_ssim(a, noise)) < 0.1)


def test_ms_ssim_single_scale_is_ssim_and_orders_noise_levels():
  a, b = _pair(3)
  np.testing.assert_allclose(ssim.ms_ssim(a, b, weights=(1.0,)), ssim.ssim(a, b), rtol=1e-5)
  _, c = _pair(3, noise=0.6)
  assert np.all(np.asarray(ssim.ms_ssim(a, b)) > np.asarray(ssim.ms_ssim(a, c)))


def test_ms_ssim_rejects_too_small_images():
  x = np.zeros((1, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match="too small"):
    ssim.ms_ssim(x, x)


def test_diversity_by_prompt_groups_and_skips_singletons():
  a, _ = _pair(4, size=32)
  noise = np.random.default_rng(5).uniform(-1, 1, a.shape).astype(np.float32)
  images = np.concatenate([a[:1], a[:1], noise[:1], noise[1:], a[1:]])
  out = ssim.diversity_by_prompt(images, ["same", "same", "diverse", "diverse", "alone"])
  assert set(out) == {"same", "diverse"}
  assert out["same"] == pytest.approx(1.0, abs=1e-5)
  assert out["diverse"] < 0.1
