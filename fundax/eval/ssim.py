"""Structural similarity (SSIM, Wang et al. 2004) and multi-scale SSIM (Wang et al. 2003), and
the diversity measure built on them: mean MS-SSIM between samples of the same prompt.

Conventions follow Wang et al. and `skimage.metrics.structural_similarity(gaussian_weights=True,
sigma=1.5, use_sample_covariance=False)`: an 11-tap Gaussian window (sigma 1.5), K1 = 0.01,
K2 = 0.03, statistics over the "valid" region only, averaged over channels. MS-SSIM uses the
standard five scales and weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) with 2x2 average
pooling between scales. Two departures, both needed for 64-128 px fundus images and both
documented where they happen: the window shrinks to the image size at coarse scales (the
standard needs >= 161 px), and negative contrast-structure terms are clipped at 0 before the
fractional powers (as tf.image.ssim_multiscale does), so the result is never NaN.

Images are NHWC float in [-1, 1] (the fundax convention); `data_range` defaults to 2.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
K1, K2 = 0.01, 0.03


def gaussian_window(size: int, sigma: float = 1.5) -> np.ndarray:
  """Normalised 1-D Gaussian of odd length `size`."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  w = np.exp(-0.5 * (x / sigma) ** 2)
  return (w / w.sum()).astype(np.float32)


def _filter(x: jax.Array, window: jax.Array) -> jax.Array:
  """Separable 'valid' Gaussian filter of [N, H, W, C] along H and W (channels independent)."""
  n, h, w, c = x.shape
  k = window.shape[0]
  y = x.transpose(0, 3, 1, 2).reshape(n * c, h, w, 1)  # channels as batch: a depthwise filter
  dn = ("NHWC", "HWIO", "NHWC")
  y = jax.lax.conv_general_dilated(y, window.reshape(k, 1, 1, 1), (1, 1), "VALID",
                                   dimension_numbers=dn)
  y = jax.lax.conv_general_dilated(y, window.reshape(1, k, 1, 1), (1, 1), "VALID",
                                   dimension_numbers=dn)
  return y.reshape(n, c, h - k + 1, w - k + 1).transpose(0, 2, 3, 1)


def _ssim_terms(x: jax.Array, y: jax.Array, window: jax.Array, data_range: float):
  """Per-image, per-channel mean luminance term and contrast-structure term: two [N, C]."""
  c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
  mu_x, mu_y = _filter(x, window), _filter(y, window)
  var_x = _filter(x * x, window) - mu_x ** 2
  var_y = _filter(y * y, window) - mu_y ** 2
  cov = _filter(x * y, window) - mu_x * mu_y
  lum = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
  cs = (2 * cov + c2) / (var_x + var_y + c2)
  return (lum * cs).mean(axis=(1, 2)), cs.mean(axis=(1, 2))


def _window_for(size: int, filter_size: int, sigma: float) -> jax.Array:
  # Shrinks the window (keeping it odd) when the image is smaller than it: coarse MS-SSIM
  # scales of small images would otherwise have no valid pixels.
  k = min(filter_size, size if size % 2 else size - 1)
  return jnp.asarray(gaussian_window(k, sigma))


@functools.partial(jax.jit, static_argnames=("filter_size", "sigma", "data_range"))
def ssim(x, y, *, filter_size: int = 11, sigma: float = 1.5, data_range: float = 2.0):
  """Single-scale SSIM per image pair.

  Args:
    x: [N, H, W, C] images.
    y: [N, H, W, C] images.
    filter_size: Gaussian window length.
    sigma: Gaussian window width.
    data_range: max - min of the pixel scale (2 for [-1, 1]).

  Returns:
    [N] SSIM, averaged over the valid region and the channels.
  """
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  window = _window_for(min(x.shape[1:3]), filter_size, sigma)
  s, _ = _ssim_terms(x, y, window, data_range)
  return s.mean(-1)


@functools.partial(jax.jit, static_argnames=("filter_size", "sigma", "data_range", "weights"))
def ms_ssim(x, y, *, filter_size: int = 11, sigma: float = 1.5, data_range: float = 2.0,
            weights: tuple[float, ...] = MS_SSIM_WEIGHTS):
  """Multi-scale SSIM per image pair.

  MS-SSIM = prod_{j<M} cs_j^{w_j} * (l_M cs_M)^{w_M}, computed per channel and then averaged.

  Args:
    x: [N, H, W, C] images; H and W >= 2^(len(weights) - 1).
    y: [N, H, W, C] images.
    filter_size: Gaussian window length at full size.
    sigma: Gaussian window width.
    data_range: max - min of the pixel scale.
    weights: per-scale exponents, finest first.

  Returns:
    [N] MS-SSIM in [0, 1].
  """
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  if min(x.shape[1:3]) < 2 ** (len(weights) - 1):
    raise ValueError(f"images {x.shape[1:3]} too small for {len(weights)} scales")
  value = 1.0
  for j, w in enumerate(weights):
    window = _window_for(min(x.shape[1:3]), filter_size, sigma)
    s, cs = _ssim_terms(x, y, window, data_range)
    # Negative cs (anti-correlated structure) would make the fractional power NaN.
    term = s if j == len(weights) - 1 else cs
    value = value * jnp.maximum(term, 0.0) ** w
    if j < len(weights) - 1:
      x, y = _pool2(x), _pool2(y)
  return value.mean(-1)


def _pool2(x: jax.Array) -> jax.Array:
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def mean_pairwise_ms_ssim(images, **kwargs) -> float:
  """Mean MS-SSIM over all unordered pairs of a set (lower = more diverse).

  Args:
    images: [N, H, W, C] with N >= 2, e.g. the samples of one prompt.
    **kwargs: passed to `ms_ssim`.

  Returns:
    The mean over the N (N - 1) / 2 pairs.
  """
  images = np.asarray(images, np.float32)
  pairs = np.array(list(itertools.combinations(range(len(images)), 2)))
  if not len(pairs):
    raise ValueError("diversity needs at least two images")
  return float(np.mean(np.asarray(ms_ssim(images[pairs[:, 0]], images[pairs[:, 1]], **kwargs))))


def diversity_by_prompt(images, prompts) -> dict[str, float]:
  """Mean pairwise MS-SSIM among samples of each prompt that has at least two samples.

  Args:
    images: [N, H, W, C] generated images.
    prompts: N prompt strings.

  Returns:
    prompt -> mean pairwise MS-SSIM.
  """
  images = np.asarray(images)
  groups: dict[str, list[int]] = {}
  for i, p in enumerate(prompts):
    groups.setdefault(p, []).append(i)
  return {p: mean_pairwise_ms_ssim(images[idx]) for p, idx in groups.items() if len(idx) >= 2}
