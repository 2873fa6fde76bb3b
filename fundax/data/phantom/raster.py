"""Vectorised drawing primitives of the phantom: pixel grids, smooth noise, segments, ellipses.

Everything the phantom draws is described in *normalised image coordinates*: x and y run from -1
(left / top edge) to +1 (right / bottom edge), so one unit is half the image width whatever the
resolution. These helpers turn such descriptions into pixel arrays at a given resolution without
per-pixel Python loops: each primitive is evaluated over a small window around it, all windows of
one size class at once, and the windows are scattered into the image with `np.maximum.at`.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

# Window side lengths (pixels) that primitives are bucketed into; bigger ones get their own size.
_WINDOW_BUCKETS = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
# The smallest radius (pixels) a primitive is drawn with, so a lesion smaller than a pixel at low
# resolution still covers the pixel under its centre and its label stays honest.
MIN_RADIUS_PX = 0.6


def px_per_unit(resolution: int) -> float:
  """Pixels per normalised unit (half the image width)."""
  return resolution / 2.0


def to_px(coord: np.ndarray, resolution: int) -> np.ndarray:
  """Maps normalised coordinates to continuous pixel coordinates (pixel centres at k + 0.5)."""
  return (np.asarray(coord, np.float64) + 1.0) * px_per_unit(resolution)


@functools.lru_cache(maxsize=64)
def pixel_grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """Normalised x [1, W] and y [H, 1] of pixel centres (broadcastable, read-only)."""
  c = (np.arange(resolution, dtype=np.float32) + 0.5) * (2.0 / resolution) - 1.0
  x, y = c[None, :], c[:, None]
  x.flags.writeable = False
  y.flags.writeable = False
  return x, y


@functools.lru_cache(maxsize=64)
def radius_grid(resolution: int) -> np.ndarray:
  """Normalised distance of every pixel centre from the image centre, [H, W] (read-only)."""
  x, y = pixel_grid(resolution)
  r = np.hypot(x, y)
  r.flags.writeable = False
  return r


@functools.lru_cache(maxsize=64)
def _bspline_matrix(cells: int, resolution: int) -> np.ndarray:
  """[resolution, cells + 3] cubic B-spline weights from grid nodes to pixel centres.

  The node grid spans [-1, 1] with `cells` cells (plus one padding node each side and one for the
  cubic support), so the same noise grid gives the same field at every resolution.
  """
  h = 2.0 / cells
  nodes = -1.0 + (np.arange(cells + 3) - 1.0) * h
  x = (np.arange(resolution) + 0.5) * (2.0 / resolution) - 1.0
  t = np.abs(x[:, None] - nodes[None, :]) / h
  w = np.where(t < 1, (4 - 6 * t**2 + 3 * t**3) / 6, np.where(t < 2, (2 - t)**3 / 6, 0.0))
  w = (w / w.sum(1, keepdims=True)).astype(np.float32)
  w.flags.writeable = False
  return w


def noise_grid(rng: np.random.Generator, cells: int) -> np.ndarray:
  """Random node values for `smooth_noise`: [cells + 3, cells + 3] standard normal."""
  return rng.standard_normal((cells + 3, cells + 3), dtype=np.float32)


def smooth_noise(grid: np.ndarray, resolution: int) -> np.ndarray:
  """Evaluates a B-spline noise field given by its node grid at every pixel.

  Args:
    grid: [g + 3, g + 3] node values from `noise_grid(rng, g)`.
    resolution: output side length in pixels.

  Returns:
    [resolution, resolution] float32 field, roughly unit variance / 2 (smoothed normal).
  """
  w = _bspline_matrix(grid.shape[0] - 3, resolution)
  return w @ grid @ w.T


def _bucket(sizes: np.ndarray) -> np.ndarray:
  """Rounds window sizes up to the bucket list (sizes past the last bucket stay as they are)."""
  buckets = np.asarray(_WINDOW_BUCKETS)
  pos = np.searchsorted(buckets, sizes)
  return np.where(pos < len(buckets), buckets[np.minimum(pos, len(buckets) - 1)], sizes)


def _windows(x0: np.ndarray, y0: np.ndarray, k: int):
  """Pixel index windows [n, k, k] whose top-left corners are (x0, y0); pixel centres too."""
  off = np.arange(k)
  xi = x0[:, None, None] + off[None, None, :]
  yi = y0[:, None, None] + off[None, :, None]
  return xi, yi, xi + 0.5, yi + 0.5


def _scatter(value, mask, xi, yi, resolution, out_value, out_mask):
  inside = (xi >= 0) & (xi < resolution) & (yi >= 0) & (yi < resolution)
  flat = (yi * resolution + xi)
  keep = inside & (value > 0)
  np.maximum.at(out_value.reshape(-1), flat[keep], value[keep])
  out_mask.reshape(-1)[flat[inside & mask]] = True


def draw_segments(p0: np.ndarray, p1: np.ndarray, r0: np.ndarray, r1: np.ndarray,
                  resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """Rasterises tapered capsules (vessel pieces) with anti-aliased edges.

  Args:
    p0, p1: [n, 2] segment end points (x, y) in normalised coordinates.
    r0, r1: [n] radii at the two ends, normalised units.
    resolution: output side length.

  Returns:
    (opacity, mask): float32 [H, W] in [0, 1], the largest coverage of any segment, shaded with a
    cylindrical profile (a vessel absorbs most along its axis); bool [H, W], pixel centres within
    the radius (or on the centre line, for vessels thinner than a pixel).
  """
  opacity = np.zeros((resolution, resolution), np.float32)
  mask = np.zeros((resolution, resolution), bool)
  if len(p0) == 0:
    return opacity, mask
  a, b = to_px(p0, resolution), to_px(p1, resolution)
  ra = np.asarray(r0) * px_per_unit(resolution)
  rb = np.asarray(r1) * px_per_unit(resolution)
  rmax = np.maximum(ra, rb) + 0.5
  lo = np.floor(np.minimum(a, b) - rmax[:, None]).astype(np.int64)
  hi = np.ceil(np.maximum(a, b) + rmax[:, None]).astype(np.int64)
  size = _bucket(np.max(hi - lo, axis=1))
  for k in np.unique(size):
    s = np.nonzero(size == k)[0]
    xi, yi, px, py = _windows(lo[s, 0], lo[s, 1], int(k))
    ax, ay = a[s, 0, None, None], a[s, 1, None, None]
    dx, dy = (b[s, 0] - a[s, 0])[:, None, None], (b[s, 1] - a[s, 1])[:, None, None]
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / np.maximum(dx * dx + dy * dy, 1e-9), 0, 1)
    dist = np.hypot(px - ax - t * dx, py - ay - t * dy)
    r = ra[s, None, None] + t * (rb[s] - ra[s])[:, None, None]
    cover = np.clip(r + 0.5 - dist, 0.0, np.minimum(2.0 * r, 1.0))
    profile = 0.4 + 0.6 * np.sqrt(np.clip(1.0 - (dist / (r + 0.5))**2, 0.0, 1.0))
    _scatter(cover * profile, dist <= np.maximum(r, 0.5), xi, yi, resolution, opacity, mask)
  return opacity, mask


def draw_ellipses(centre: np.ndarray, radii: np.ndarray, angle: np.ndarray, strength: np.ndarray,
                  resolution: int, softness: float = 0.0, dome: float = 0.0,
                  irregularity: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """Rasterises filled ellipses (lesions, patches).

  Args:
    centre: [n, 2] centres, normalised coordinates.
    radii: [n, 2] semi-axes (along `angle`, across it), normalised units.
    angle: [n] orientation of the first axis, radians, measured from +x towards +y.
    strength: [n] peak value of each ellipse, in [0, 1].
    resolution: output side length.
    softness: edge width as a fraction of the radius (0: a one-pixel anti-aliased edge).
    dome: 0 gives a flat top; 1 a value falling off towards the edge like a dome.
    irregularity: relative wobble of the outline (0: a true ellipse); the wobble's phase comes
      from the centre, so a lesion keeps its shape at every resolution.

  Returns:
    (value, mask): float32 [H, W], the largest value of any ellipse; bool [H, W], pixel centres
    inside an ellipse plus the pixel under each centre.
  """
  value = np.zeros((resolution, resolution), np.float32)
  mask = np.zeros((resolution, resolution), bool)
  if len(centre) == 0:
    return value, mask
  c = to_px(centre, resolution)
  r = np.maximum(np.asarray(radii) * px_per_unit(resolution), MIN_RADIUS_PX)
  edge = np.maximum(softness * r.min(1), 1.0)
  reach = r.max(1) + edge + 1.0
  lo = np.floor(c - reach[:, None]).astype(np.int64)
  size = _bucket(np.ceil(2 * reach).astype(np.int64) + 1)
  cos, sin = np.cos(angle), np.sin(angle)
  for k in np.unique(size):
    s = np.nonzero(size == k)[0]
    xi, yi, px, py = _windows(lo[s, 0], lo[s, 1], int(k))
    dx, dy = px - c[s, 0, None, None], py - c[s, 1, None, None]
    u = dx * cos[s, None, None] + dy * sin[s, None, None]
    v = -dx * sin[s, None, None] + dy * cos[s, None, None]
    q = np.hypot(u / r[s, 0, None, None], v / r[s, 1, None, None])
    if irregularity:
      theta = np.arctan2(v / r[s, 1, None, None], u / r[s, 0, None, None])
      phase = (1e3 * (centre[s, 0] + 2 * centre[s, 1]))[:, None, None]
      q = q / (1 + irregularity * (0.6 * np.sin(3 * theta + phase) +
                                   0.4 * np.sin(5 * theta + 2 * phase)))
    rmin = r[s].min(1)[:, None, None]
    val = np.clip((1.0 - q) * rmin / edge[s, None, None] + 0.5, 0.0, 1.0)
    val = val * (1.0 - dome * np.clip(q, 0.0, 1.0)**2) * strength[s, None, None]
    # a lesion thinner than a pixel covers only part of it
    val = val * np.minimum(2.0 * rmin, 1.0)
    inside = (q <= 1.0) | ((np.abs(dx) <= 0.5) & (np.abs(dy) <= 0.5))
    _scatter(val.astype(np.float32), inside, xi, yi, resolution, value, mask)
  return value, mask


def blur(image: np.ndarray, sigma_units: float, resolution: int) -> np.ndarray:
  """Gaussian blur with its width in normalised units (so it looks the same at any resolution).

  Args:
    image: [H, W] or [H, W, C] array.
    sigma_units: standard deviation in normalised units.
    resolution: the image side length.

  Returns:
    The blurred float32 array.
  """
  sigma = sigma_units * px_per_unit(resolution)
  if sigma < 0.3:
    return image.astype(np.float32)
  sig = (sigma, sigma) + (0,) * (image.ndim - 2)
  return ndimage.gaussian_filter(image.astype(np.float32), sig, mode="nearest", truncate=3.0)
