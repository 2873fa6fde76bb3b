"""Anatomy detectors that need no trained network, validated against the phantom's masks.

Owns the field-of-view, optic-disc, fovea and vessel detectors that check generated fundus
photographs, the per-image summary `measure` and the report aggregates (`disc_side_agreement`,
`vessel_ratio`); bench/detectors.py scores them against phantom ground truth (bench/results/).

They work in log intensity, where a photograph is illumination times reflectance, after
subtracting a robust quadratic fitted inside the field of view (the illumination: exposure and
gradient defects). Sizes are fractions of the FOV radius, so raw renders (circle inside the
square) and FOV crops (circle filling it) go through the same code at any resolution.

  * Optic disc: of the strongest disc-sized bright centre-surround blobs of the flattened
    green+blue brightness (yellow-white disc, red fundus), the one scoring best on contrast plus
    the density of vessels running radially around it; below DISC_MIN_SCORE there is no disc.
  * Fovea: the darkest disc-sized spot of the vessel-free (median-filtered) brightness relative
    to its surround, 1.8-3.3 disc diameters from the disc and within 35 degrees of horizontal.
  * Vessels: one-pixel centre lines where a scale-normalised Hessian ridge strength of the log
    green channel (a dark line's cross-curvature, blobs damped) peaks across the line,
    hysteresis-thresholded, short pieces dropped; the vessel fraction is their length times a
    calibrated area per pixel. The threshold is an absolute contrast (raised in noisy images to
    their pixel noise), not a quantile of each image's responses: a quantile would find the
    same fraction in a blank or blurred image, which is what the check must catch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy import signal

from fundax.data import captions

FOV_FRACTION = 0.1  # of the 99th-percentile brightness: the field of view is brighter than this
FOV_FLOOR = 8 / 255  # absolute floor of that threshold ([0, 1] brightness)
DISC_RADIUS = 0.115  # expected optic-disc radius / FOV radius (disc diameter ~1/8.6 of the FOV)
DISC_CANDIDATES = 5  # brightest blobs re-ranked by the vessels around them
DISC_VESSEL_WEIGHT = 0.2  # weight of the radial vessel density around a candidate in its score
# Floor of the FOV's vessel centre-line density (pixels per FOV pixel, times the FOV radius)
# that density is measured against; phantoms have 1.3-4 at 64 px, 2.4-6 at 128 px.
DISC_MIN_DENSITY = 1.5
# Score below which no disc is found: phantom discs score >= 0.45 (0.27 blurred to sigma 1.5 px
# at 64 px, their vessels gone), smooth blotches of 10% brightness std below 0.2.
DISC_MIN_SCORE = 0.25
FOVEA_DISTANCE = (1.8, 3.3)  # fovea search annulus around the disc, in disc diameters
FOVEA_MAX_ANGLE = 35.0  # degrees from horizontal
FOVEA_SURROUND = 1.0  # weight of the surround (1.5-3 disc radii) subtracted from the darkness
VESSEL_SCALES = (0.012, 0.018, 0.024)  # Hessian scales (Gaussian std) / FOV radius
VESSEL_MIN_SIGMA = 0.7  # pixels: finer scales respond to the pixel grid's phase
VESSEL_BLOBNESS = 0.5  # Frangi's beta: damping of ridges as curvature along nears curvature across
# (FOV radius px, ridge threshold (scale-normalised log contrast), noise factor: the threshold is
# at least this times the pixel noise, area per centre-line pixel: the vessels' mean calibre,
# ~1.3 px, over the share of their length found), calibrated at 64 and 128 px, raw and cropped,
# on phantom seeds 100_000_000+ (never the validation seeds) so the estimated vessel fraction
# matches the drawn mask's. Interpolated in log radius, constant beyond the rows (unvalidated).
VESSEL_CALIBRATION = ((31.0, 0.04, 1.0, 2.03), (62.0, 0.04, 1.0, 1.53))
VESSEL_LOW = 0.5  # hysteresis: weaker crest pixels count when connected to a strong one
VESSEL_MIN_LENGTH = 0.3  # connected centre lines shorter than this (FOV radii) are noise
_EPS = 2 / 255  # added before taking logs, so black pixels stay finite


class Disc(NamedTuple):
  """A detected optic disc, in pixel coordinates (x right, y down, pixel centres at k + 0.5)."""

  x: float
  y: float
  radius: float
  contrast: float  # mean log brightness of the disc over its surround
  score: float  # contrast + DISC_VESSEL_WEIGHT * radial vessel density around it: the confidence

  @property
  def found(self) -> bool:
    """Whether the blob is confidently a disc (score at least DISC_MIN_SCORE)."""
    return self.score >= DISC_MIN_SCORE


def _unit(image) -> np.ndarray:
  """[H, W, 3] uint8 or float in [-1, 1] -> float64 in [0, 1]."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image.astype(np.float64) / 255.0
  return np.clip((image.astype(np.float64) + 1.0) / 2.0, 0.0, 1.0)


def fov_mask(image) -> np.ndarray:
  """The field of view, bool [H, W].

  Args:
    image: [H, W, 3] uint8 or float in [-1, 1].

  Returns:
    The largest connected region whose 3x3-median brightness exceeds FOV_FRACTION of the 99th
    percentile (and FOV_FLOOR), holes filled.
  """
  lum = ndimage.median_filter(_unit(image).mean(-1), size=3)
  bright = lum > max(FOV_FRACTION * np.percentile(lum, 99), FOV_FLOOR)
  labels, n = ndimage.label(bright)
  if n == 0:
    return bright
  return ndimage.binary_fill_holes(labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1)


def _flatten(log_image: np.ndarray, fov: np.ndarray) -> np.ndarray:
  """Log image minus a robust quadratic fit over the FOV (the illumination); 0 outside."""
  h, w = log_image.shape
  ys, xs = np.nonzero(ndimage.binary_erosion(fov, iterations=2))  # not the dim rim
  if len(xs) < 12:
    return np.zeros_like(log_image)
  step = max(1, len(xs) // 4000)
  u, v, z = xs[::step] / w - 0.5, ys[::step] / h - 0.5, log_image[ys[::step], xs[::step]]
  design = np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], -1)
  keep = np.ones(len(z), bool)
  for _ in range(3):  # refit without the outliers (disc, lesions, vessels)
    coef = np.linalg.lstsq(design[keep], z[keep], rcond=None)[0]
    resid = z - design @ coef
    spread = 1.4826 * np.median(np.abs(resid[keep] - np.median(resid[keep]))) + 1e-6
    keep = np.abs(resid) < 2.5 * spread
  u, v = np.arange(w)[None, :] / w - 0.5, np.arange(h)[:, None] / h - 0.5
  fit = coef[0] + coef[1] * u + coef[2] * v + coef[3] * u * u + coef[4] * u * v + coef[5] * v * v
  return np.where(fov, log_image - fit, 0.0)


class _View:
  """One image prepared for the detectors; the maps several of them need are computed once."""

  def __init__(self, image, fov: np.ndarray | None = None):
    self.unit = _unit(image)
    self.fov = fov_mask(image) if fov is None else np.asarray(fov, bool)
    self.radius = float(np.sqrt(self.fov.sum() / np.pi))  # FOV radius, px: the unit of size
    self.disc_r = DISC_RADIUS * self.radius

  @functools.cached_property
  def brightness(self) -> np.ndarray:
    """Flattened log green+blue: the disc is yellow-white, the fundus red."""
    return _flatten(np.log(self.unit[..., 1:].mean(-1) + _EPS), self.fov)

  @functools.cached_property
  def ridges(self) -> tuple[np.ndarray, np.ndarray, float]:
    """(dark-line strength, normal, pixel noise) of the flattened log green channel."""
    green = _flatten(np.log(self.unit[..., 1] + _EPS), self.fov)
    inner = ndimage.binary_erosion(self.fov, iterations=2)
    residual = np.abs(green - ndimage.median_filter(green, size=3))[inner]
    noise = 1.4826 * np.median(residual) if residual.size else 0.0
    return *_ridges(green, self.radius), float(noise)

  @functools.cached_property
  def vessels(self) -> np.ndarray:
    return _vessels(self)

  @functools.cached_property
  def disc(self) -> Disc:
    return _disc(self)

  def distance(self, x: float, y: float) -> np.ndarray:
    """[H, W] distance in pixels of every pixel centre from (x, y)."""
    h, w = self.fov.shape
    return np.hypot(np.arange(w)[None, :] + 0.5 - x, np.arange(h)[:, None] + 0.5 - y)


def _disk(radius: float, inner: float = -1.0) -> np.ndarray:
  """Kernel of ones at distances in (inner, radius] from its centre."""
  k = int(np.ceil(radius))
  yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
  dist = np.hypot(xx, yy)
  return ((dist > inner) & (dist <= radius)).astype(np.float64)


def _local_mean(values: np.ndarray, weight: np.ndarray, kernel: np.ndarray):
  """(weighted mean over the kernel, weight sum over the kernel) at every pixel."""
  num = signal.fftconvolve(values * weight, kernel, mode="same")
  den = signal.fftconvolve(weight, kernel, mode="same")
  return num / np.maximum(den, 1e-6), den


def detect_disc(image) -> Disc:
  """Finds the optic disc.

  Args:
    image: [H, W, 3] uint8 or float in [-1, 1].

  Returns:
    The Disc; `.found` says whether its score is that of a disc.
  """
  return _View(image).disc


def _disc(view: _View) -> Disc:
  fov, r0, flat = view.fov, view.disc_r, view.brightness
  weight = fov.astype(np.float64)
  centre, ring = _disk(r0), _disk(2.3 * r0, 1.3 * r0)
  inner, inner_w = _local_mean(flat, weight, centre)
  outer, outer_w = _local_mean(flat, weight, ring)
  valid = (inner_w > 0.5 * centre.sum()) & (outer_w > 0.3 * ring.sum()) & fov
  contrast = np.where(valid, inner - outer, -np.inf)
  ys, xs = np.nonzero(valid & (contrast == ndimage.maximum_filter(contrast, int(2 * r0) | 1)))
  if len(xs) == 0:
    return Disc(fov.shape[1] / 2, fov.shape[0] / 2, r0, 0.0, 0.0)
  top = np.argsort(contrast[ys, xs])[::-1][:DISC_CANDIDATES]
  ys, xs = ys[top], xs[top]
  score = contrast[ys, xs] + DISC_VESSEL_WEIGHT * np.array(
      [_convergence(view, x + 0.5, y + 0.5) for x, y in zip(xs, ys)])
  best = np.argmax(score)
  x, y = xs[best], ys[best]
  # centre: brightness-weighted centroid; radius: the area brighter than half the contrast
  dist = view.distance(x + 0.5, y + 0.5)
  excess = np.where(fov, flat - outer[y, x], 0.0)
  labels, _ = ndimage.label(ndimage.binary_fill_holes(
      (excess > 0.5 * contrast[y, x]) & (dist <= 1.5 * r0)))
  blob = labels == labels[y, x] if labels[y, x] else labels > 0
  radius = float(np.clip(np.sqrt(blob.sum() / np.pi), 0.5 * r0, 2 * r0))
  w = np.clip(excess, 0, None) * (dist <= r0)
  rows, cols = np.indices(w.shape)
  total = max(w.sum(), 1e-9)
  return Disc(float((w * cols).sum() / total) + 0.5, float((w * rows).sum() / total) + 0.5,
              radius, float(contrast[y, x]), float(score[best]))


def _convergence(view: _View, x: float, y: float) -> float:
  """How densely vessels run radially 1-3 disc radii from (x, y), as they leave a disc.

  Centre-line pixels in that ring weighted by cos^2 of the angle between their line and the
  radius, per ring pixel, over the centre-line density of the whole FOV (at least
  DISC_MIN_DENSITY, so that a few stray lines in a vessel-free image do not count for much).
  """
  dist = view.distance(x, y)
  ring = (dist > view.disc_r) & (dist <= 3 * view.disc_r) & view.fov
  rows, cols = np.nonzero(view.vessels & ring)
  normal = view.ridges[1][:, rows, cols]
  radial = np.stack([rows + 0.5 - y, cols + 0.5 - x]) / dist[rows, cols]
  radial_lines = (1.0 - (normal * radial).sum(0)**2).sum()
  density = max(view.vessels[view.fov].mean(), DISC_MIN_DENSITY / view.radius)
  return float(radial_lines / max(ring.sum(), 1) / density)


def detect_fovea(image, disc: Disc | None = None) -> tuple[float, float] | None:
  """Finds the fovea: the darkest disc-sized region beside the disc, roughly horizontally.

  Args:
    image: [H, W, 3] uint8 or float in [-1, 1].
    disc: the optic disc (detected when not given).

  Returns:
    (x, y) in pixels, or None when no disc is found or the search region is empty.
  """
  view = _View(image)
  return _fovea(view, view.disc if disc is None else disc)


def _fovea(view: _View, disc: Disc) -> tuple[float, float] | None:
  if not disc.found:
    return None
  r0 = view.disc_r
  dd = 2 * np.clip(disc.radius, 0.75 * r0, 1.35 * r0)
  # a median wipes out the vessels (dark, but not macula); then how much darker a disc-sized
  # area is than its surround, so that shading at the field's edge does not pass for a macula
  flat = ndimage.median_filter(view.brightness, size=int(r0) | 1)
  weight = view.fov.astype(np.float64)
  dark = (_local_mean(flat, weight, _disk(r0))[0] -
          FOVEA_SURROUND * _local_mean(flat, weight, _disk(3 * r0, 1.5 * r0))[0])
  h, w = view.fov.shape
  dx = np.abs(np.arange(w)[None, :] + 0.5 - disc.x)
  dy = np.abs(np.arange(h)[:, None] + 0.5 - disc.y)
  dist = np.hypot(dx, dy)
  region = ((dist >= FOVEA_DISTANCE[0] * dd) & (dist <= FOVEA_DISTANCE[1] * dd) &
            (dy <= np.tan(np.radians(FOVEA_MAX_ANGLE)) * dx) &
            ndimage.binary_erosion(view.fov, iterations=max(1, int(r0))))
  if not region.any():
    return None
  y, x = np.unravel_index(np.argmin(np.where(region, dark, np.inf)), dark.shape)
  return float(x) + 0.5, float(y) + 0.5


def _ridges(log_green: np.ndarray, fov_r: float) -> tuple[np.ndarray, np.ndarray]:
  """(strength [H, W], unit normal across the line [2 (rows, cols), H, W]) of dark lines.

  Strength is the scale-normalised curvature across a dark line (log units: a contrast), damped
  where the curvature along it is comparable (blobs), maximised over VESSEL_SCALES.
  """
  best, angle = np.zeros_like(log_green), np.zeros_like(log_green)
  for scale in VESSEL_SCALES:
    s = max(scale * fov_r, VESSEL_MIN_SIGMA)
    hrr = ndimage.gaussian_filter(log_green, s, order=(2, 0)) * s * s
    hcc = ndimage.gaussian_filter(log_green, s, order=(0, 2)) * s * s
    hrc = ndimage.gaussian_filter(log_green, s, order=(1, 1)) * s * s
    half = np.hypot((hrr - hcc) / 2, hrc)
    across, along = (hrr + hcc) / 2 + half, (hrr + hcc) / 2 - half
    line = np.where(across > 0, across * np.exp(
        -(along / np.maximum(across, 1e-9))**2 / (2 * VESSEL_BLOBNESS**2)), 0.0)
    better = line > best
    best = np.where(better, line, best)
    angle = np.where(better, 0.5 * np.arctan2(2 * hrc, hrr - hcc), angle)
  return best, np.stack([np.cos(angle), np.sin(angle)])


def _calibration(fov_r: float) -> tuple[float, float, float]:
  """(ridge threshold, noise factor, area per centre-line pixel) at a FOV radius."""
  table = np.array(VESSEL_CALIBRATION)
  at, radii = np.log(max(fov_r, 1.0)), np.log(table[:, 0])
  return tuple(float(np.interp(at, radii, table[:, i])) for i in (1, 2, 3))


def _vessels(view: _View) -> np.ndarray:
  inner = ndimage.binary_erosion(view.fov, iterations=2)
  strength, normal, noise = view.ridges
  high, noise_factor, _ = _calibration(view.radius)
  high = max(high, noise_factor * noise)
  rows, cols = np.indices(strength.shape)
  ahead = ndimage.map_coordinates(strength, [rows + normal[0], cols + normal[1]], order=1)
  behind = ndimage.map_coordinates(strength, [rows - normal[0], cols - normal[1]], order=1)
  crest = (strength >= ahead) & (strength >= behind) & inner & (strength >= VESSEL_LOW * high)
  labels, n = ndimage.label(crest, structure=np.ones((3, 3)))
  if n == 0:
    return crest
  keep = np.bincount(labels.ravel(), minlength=n + 1) >= VESSEL_MIN_LENGTH * view.radius
  keep &= ndimage.maximum(strength, labels, np.arange(n + 1)) >= high  # hysteresis
  keep[0] = False
  return keep[labels]


def vessel_map(image, fov: np.ndarray | None = None) -> np.ndarray:
  """Detected vessel centre lines, bool [H, W].

  Args:
    image: [H, W, 3] uint8 or float in [-1, 1].
    fov: optional field-of-view mask (detected when not given).

  Returns:
    One-pixel-wide lines inside the FOV (less a two-pixel rim): ridge pixels that are the
    strongest across their line and pass the calibrated hysteresis threshold, in connected
    lines at least VESSEL_MIN_LENGTH FOV radii long.
  """
  return _View(image, fov).vessels


def _fraction(view: _View, centre_lines: np.ndarray) -> float:
  return float(_calibration(view.radius)[2] * centre_lines.sum() / max(view.fov.sum(), 1))


def vessel_fraction(image) -> float:
  """Estimated fraction of the field of view covered by vessels.

  Args:
    image: [H, W, 3] uint8 or float in [-1, 1].

  Returns:
    Centre-line pixels of vessel_map times the calibrated area per centre-line pixel, over the
    FOV's pixels.
  """
  view = _View(image)
  return _fraction(view, view.vessels)


def _contrast(view: _View, disc: Disc) -> float:
  if not disc.found:
    return float("nan")
  lum, dist = view.unit.mean(-1), view.distance(disc.x, disc.y)
  inside, outside = (dist <= disc.radius) & view.fov, (dist > 2 * disc.radius) & view.fov
  if not inside.any() or not outside.any():
    return float("nan")
  return float(lum[inside].mean() / max(np.median(lum[outside]), _EPS))


def disc_contrast(image, disc: Disc | None = None) -> float:
  """Disc-to-background luminance ratio.

  Args:
    image: [H, W, 3] uint8 or float in [-1, 1].
    disc: the optic disc (detected when not given).

  Returns:
    Mean luminance inside the disc over the median luminance of the FOV beyond two disc radii
    (NaN when no disc is found).
  """
  view = _View(image)
  return _contrast(view, view.disc if disc is None else disc)


def disc_side(image) -> str | None:
  """"right" or "left": the image half holding the detected disc; None when none is found.

  Meaningful for macula-centred images only (a disc-centred image has its disc in the middle).
  """
  return measure(image)["disc_side"]


def fovea_side(image) -> str | None:
  """"right" or "left": the side of the disc the fovea lies on; None when either is missing.

  The fovea is temporal to the disc, so a right eye's fovea lies left of its disc in any field;
  in a disc-centred image that is also the image half holding the fovea.
  """
  return measure(image)["fovea_side"]


def _side(x: float, middle: float) -> str:
  return "right" if x >= middle else "left"


def measure(image) -> dict:
  """Every detector on one image.

  Args:
    image: [H, W, 3] uint8 or float in [-1, 1].

  Returns:
    {"fov_radius", "disc_found", "disc_score", "disc_x", "disc_y", "disc_radius",
    "disc_contrast", "disc_side", "fovea_x", "fovea_y", "fovea_side", "vessel_fraction"}:
    positions and sizes in pixels, NaN (sides None) where not found; the sides are those of
    disc_side and fovea_side.
  """
  view = _View(image)
  disc, nan = view.disc, float("nan")
  fovea = _fovea(view, disc)
  return {"fov_radius": view.radius, "disc_found": disc.found, "disc_score": disc.score,
          "disc_x": disc.x if disc.found else nan, "disc_y": disc.y if disc.found else nan,
          "disc_radius": disc.radius if disc.found else nan,
          "disc_contrast": _contrast(view, disc),
          "disc_side": _side(disc.x, view.fov.shape[1] / 2) if disc.found else None,
          "fovea_x": nan if fovea is None else fovea[0],
          "fovea_y": nan if fovea is None else fovea[1],
          "fovea_side": None if fovea is None else _side(fovea[0], disc.x),
          "vessel_fraction": _fraction(view, view.vessels)}


def disc_side_agreement(images, prompts: Sequence[str]) -> dict:
  """How often the eye's detected laterality matches the laterality each prompt asks for.

  Macula-centred prompts are scored by the side of the disc (a right eye's disc is on the
  image's right); disc-centred prompts by the side of the disc the fovea lies on (a right eye's
  fovea is left of its disc), since their disc sits in the middle. Prompts without a laterality
  are skipped, and so are prompts without a field: with the field unknown, neither side is
  defined. An image where the disc (or, for disc-centred prompts, the fovea) is not found counts
  as disagreeing.

  Args:
    images: [N, H, W, 3] uint8 or float in [-1, 1].
    prompts: N prompts (parsed with captions.parse_caption).

  Returns:
    {"n", "accuracy", "n_macula", "accuracy_macula", "n_disc", "accuracy_disc"}: counts of
    scored images and the fraction agreeing, overall and per field (NaN when none scored).
  """
  hits = {"macula": [], "disc": []}
  for image, prompt in zip(images, prompts):
    asked = captions.parse_caption(prompt)
    if asked.laterality is None or asked.field not in hits:
      continue
    m = measure(image)
    # a right eye's fovea lies left of its disc
    seen = m["disc_side"] if asked.field == "macula" else {"left": "right", "right": "left"}.get(
        m["fovea_side"])
    hits[asked.field].append(seen == asked.laterality)
  every = hits["macula"] + hits["disc"]
  out = {"n": len(every), "accuracy": _mean(every)}
  for field, h in hits.items():
    out |= {f"n_{field}": len(h), f"accuracy_{field}": _mean(h)}
  return out


def _mean(values) -> float:
  return float(np.mean(values)) if len(values) else float("nan")


def vessel_ratio(images, reference_images) -> dict:
  """Vessel fractions of generated images against reference images, as a ratio of means.

  Args:
    images: [N, H, W, 3] generated images.
    reference_images: [M, H', W', 3] real (or phantom) images, ideally at the same size.

  Returns:
    {"generated_mean", "reference_mean", "ratio": generated_mean / reference_mean (NaN when
    the reference shows no vessels), "generated": [N], "reference": [M]} (vessel_fraction of
    each image).
  """
  gen = [vessel_fraction(x) for x in images]
  ref = [vessel_fraction(x) for x in reference_images]
  ratio = _mean(gen) / _mean(ref) if _mean(ref) > 0 else float("nan")
  return {"generated_mean": _mean(gen), "reference_mean": _mean(ref), "ratio": ratio,
          "generated": gen, "reference": ref}
