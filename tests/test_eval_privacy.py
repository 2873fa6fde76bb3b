"""The memorisation audit flags a planted copy and nothing else."""

import numpy as np
import pytest

from fundax.eval import metrics
from fundax.eval import privacy


def test_nearest_neighbours_match_brute_force_across_chunks():
  rng = np.random.default_rng(0)
  q, r = rng.normal(size=(13, 5)), rng.normal(size=(11, 5))
  dist, idx = privacy.nearest_neighbours(q, r, chunk=4)
  d = np.sqrt(metrics.pairwise_sq_distances(q, r))
  np.testing.assert_array_equal(idx, d.argmin(1))
  np.testing.assert_allclose(dist, d.min(1))
  _, self_idx = privacy.nearest_neighbours(r, r, chunk=4, exclude_self=True)
  assert np.all(self_idx != np.arange(len(r)))


def test_planted_copy_is_flagged_and_listed_first():
  rng = np.random.default_rng(1)
  training = rng.uniform(-1, 1, (20, 16, 16, 3)).astype(np.float32)
  generated = rng.uniform(-1, 1, (6, 16, 16, 3)).astype(np.float32)
  # Generated image 3 is training image 7 plus faint noise (RMS 0.01 < threshold 0.05).
  generated[3] = np.clip(training[7] + 0.01 * rng.normal(size=training[7].shape), -1, 1)
  out = privacy.audit(generated, training, pixel_threshold=0.05, num_pairs=2)
  assert out["flagged"] == [False, False, False, True, False, False]
  assert out["closest_pairs"][0][:2] == (3, 7)
  assert out["closest_pairs"][0][2] == pytest.approx(0.01, abs=0.002)
  # Two independent uniform images differ by RMS sqrt(2/3) ~ 0.82.
  assert sorted(out["pixel_rms"])[1] == pytest.approx(0.82, abs=0.05)


def test_feature_space_flags_a_copy_pixels_miss():
  rng = np.random.default_rng(2)
  training = rng.uniform(-1, 1, (10, 8, 8, 3)).astype(np.float32)
  generated = rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
  train_feat = rng.normal(size=(10, 4))
  gen_feat = rng.normal(size=(3, 4)) + 5.0
  gen_feat[1] = train_feat[4] + 1e-3  # e.g. a flipped or shifted copy: far in pixels, not here
  out = privacy.audit(generated, training, gen_feat, train_feat)
  assert out["flagged"] == [False, True, False]
  assert out["feature_nn"][1] == 4 and out["min_feature_ratio"] < 0.01


def test_uint8_images_are_rescaled():
  x = np.full((1, 4, 4, 3), 255, np.uint8)
  np.testing.assert_allclose(privacy.pixel_vectors(x), 1.0)
