"""Fidelity metrics against closed forms, direct computations and hand-worked cases."""

import jax
import numpy as np
import pytest
import scipy.linalg

from fundax.eval import metrics


def _random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_identical_sets_is_zero():
  x = np.random.default_rng(0).normal(size=(50, 8))
  assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_frechet_identical_rank_deficient_sets_is_zero():
  # N < D: singular covariances, where a naive sqrtm returns complex noise.
  x = np.random.default_rng(1).normal(size=(10, 32))
  assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_gaussian_frechet_diagonal_closed_form():
  # Diagonal covariances: FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2 = 1+4 + (2-1)^2 + (3-1)^2 = 10.
  fd = metrics.gaussian_frechet_distance([0.0, 0.0], np.diag([4.0, 9.0]), [1.0, 2.0],
                                         np.diag([1.0, 1.0]))
  assert fd == pytest.approx(10.0, abs=1e-12)


def test_gaussian_frechet_matches_scipy_sqrtm():
  rng = np.random.default_rng(2)
  s1, s2 = _random_spd(rng, 6), _random_spd(rng, 6)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2)
              - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
  assert metrics.gaussian_frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_of_samples_approaches_closed_form():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(20000, 2)) * [2.0, 3.0]
  b = rng.normal(size=(20000, 2)) + [1.0, 2.0]
  assert metrics.frechet_distance(a, b) == pytest.approx(10.0, rel=0.03)


def _direct_mmd2(x, y):
  """O(n^2) double loops over the cubic polynomial kernel, as in Bińkowski et al. eq. (4)."""
  d = x.shape[1]
  k = lambda a, b: (a @ b / d + 1.0) ** 3
  m, n = len(x), len(y)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return xx + yy - 2 * xy


def test_mmd2_matches_direct_computation():
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(7, 3)), rng.normal(size=(9, 3)) + 0.5
  assert metrics.mmd2_unbiased(x, y) == pytest.approx(_direct_mmd2(x, y), rel=1e-10)


def test_kid_is_unbiased_for_one_distribution():
  rng = np.random.default_rng(5)
  values = [metrics.mmd2_unbiased(rng.normal(size=(20, 4)), rng.normal(size=(20, 4)))
            for _ in range(400)]
  # Unbiased: mean ~0 within 4 standard errors; individual estimates are often negative.
  assert abs(np.mean(values)) < 4 * np.std(values) / np.sqrt(len(values))
  assert min(values) < 0


def test_kid_detects_a_shift_and_subsets_are_clipped():
  rng = np.random.default_rng(6)
  a, b = rng.normal(size=(60, 4)), rng.normal(size=(40, 4)) + 1.0
  kid = metrics.kernel_inception_distance(a, b, num_subsets=10, subset_size=1000)
  assert kid["subset_size"] == 40
  assert kid["kid"] > 10 * kid["kid_std"] / np.sqrt(10) > 0


def test_precision_recall_hand_case():
  # Real 0,1,2,3 with k=1: every real radius is 1, so fake 0.5 is inside and fake 10 is not
  # (precision 1/2). The two fakes are 9.5 apart, so both fake radii are 9.5 and all real points
  # lie within 9.5 of 0.5 (recall 1).
  real = np.array([[0.0], [1.0], [2.0], [3.0]])
  fake = np.array([[0.5], [10.0]])
  assert metrics.precision_recall(real, fake, k=1) == {"precision": 0.5, "recall": 1.0}


def test_precision_recall_disjoint_sets():
  real = np.array([[0.0], [1.0], [2.0]])
  fake = np.array([[100.0], [101.0], [102.0]])
  assert metrics.precision_recall(real, fake, k=1) == {"precision": 0.0, "recall": 0.0}


def test_feature_fn_missing_path_says_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not download"):
    metrics.load_feature_fn(str(tmp_path / "inception.bin"))
  with pytest.raises(FileNotFoundError):
    metrics.load_feature_fn(None)


def test_feature_fn_loads_an_exported_function(tmp_path):
  # A stand-in for an exported Inception: the per-channel mean, with a symbolic batch.
  fn = jax.jit(lambda x: x.mean(axis=(1, 2)))
  batch, = jax.export.symbolic_shape("b")
  exported = jax.export.export(fn)(jax.ShapeDtypeStruct((batch, 8, 8, 3), np.float32))
  path = tmp_path / "features.bin"
  path.write_bytes(exported.serialize())
  images = np.random.default_rng(7).uniform(-1, 1, (5, 8, 8, 3)).astype(np.float32)
  loaded = metrics.load_feature_fn(str(path))
  np.testing.assert_allclose(loaded(images), images.mean(axis=(1, 2)), atol=1e-6)
