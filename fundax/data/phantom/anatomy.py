"""Anatomy of the phantom eye: geometry, fundus background, macula, optic disc, field of view.

`Geometry` places the eye in normalised image coordinates (x, y in [-1, 1], y down): the field
of view is a circle centred on the image, the optic disc sits on the nasal side (the right of the
image for a right eye), and the fovea lies about 2.5 disc diameters temporal to it. The drawing
functions work on float RGB images in [0, 1] (display values, as in a photograph).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fundax.data.phantom import raster

# Fundus base colour per pigmentation (display RGB, before texture, macula and vignetting),
# chosen so a medium fundus matches skimage.data.retina() (see tests/test_phantom_realism.py).
BASE_COLOURS = {
    "light": (0.98, 0.48, 0.36),
    "medium": (0.95, 0.42, 0.30),
    "dark": (0.74, 0.29, 0.15),
}
# Noise octaves of the choroidal texture: (cells across the image, relative amplitude).
_TEXTURE_OCTAVES = ((4, 1.0), (12, 0.5), (32, 0.3), (80, 0.2), (160, 0.2))
_TESSELLATION_CELLS = 26
# Macular pigment absorbs green and blue much more than red (per-channel absorbance at the fovea).
_MACULA_ABSORBANCE = np.array([0.10, 0.55, 0.85], np.float32)
RIM_COLOUR = np.array([1.0, 0.85, 0.62], np.float32)
RIM_EDGE_COLOUR = np.array([1.0, 0.7, 0.5], np.float32)
CUP_COLOUR = np.array([1.0, 0.95, 0.82], np.float32)
SWOLLEN_DISC_COLOUR = np.array([1.0, 0.70, 0.50], np.float32)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Where the eye's landmarks are, in normalised image coordinates."""

  fovea: tuple[float, float]
  disc: tuple[float, float]
  disc_diameter: float  # horizontal disc diameter (DD), normalised units
  disc_aspect: float  # vertical / horizontal disc diameter (discs are slightly tall)
  fov_radius: float  # radius of the circular field of view, centred on the image
  nasal_sign: float  # +1: nasal side (disc side) is +x, i.e. a right eye

  @property
  def disc_radii(self) -> tuple[float, float]:
    """(horizontal, vertical) disc radius."""
    return self.disc_diameter / 2, self.disc_diameter * self.disc_aspect / 2


def _ellipse_field(x, y, centre, rx, ry):
  """Normalised elliptical radius: < 1 inside the ellipse."""
  return np.hypot((x - centre[0]) / rx, (y - centre[1]) / ry)


def background(geometry: Geometry, pigmentation: str, tessellation: float,
               texture: list[np.ndarray], resolution: int) -> np.ndarray:
  """Fundus background: base colour, choroidal texture, tessellation and macular pigment.

  Args:
    geometry: landmark positions.
    pigmentation: one of BASE_COLOURS.
    tessellation: 0 (none) to 1 (strongly visible choroidal vessels).
    texture: noise grids (raster.noise_grid) for the _TEXTURE_OCTAVES plus one for tessellation.
    resolution: side length.

  Returns:
    float32 [H, W, 3] image in [0, 1].
  """
  base = np.asarray(BASE_COLOURS[pigmentation], np.float32)
  n = sum(a * raster.smooth_noise(g, resolution) for (_, a), g in zip(_TEXTURE_OCTAVES, texture))
  # texture modulates brightness, a little more in green/blue (pigment density varies)
  img = base * np.exp(n[..., None] * np.array([0.06, 0.13, 0.14], np.float32))
  if tessellation > 0:
    ridge = np.abs(raster.smooth_noise(texture[-1], resolution))
    # broad orange choroidal vessels (where the noise crosses zero) between darker interspaces
    inter = np.clip((ridge - 0.1) * 3.0, 0.0, 1.0) * tessellation
    img = img * (1.0 - inter[..., None] * np.array([0.06, 0.2, 0.22], np.float32))
  x, y = raster.pixel_grid(resolution)
  dd = geometry.disc_diameter
  d2 = (x - geometry.fovea[0])**2 + (y - geometry.fovea[1])**2
  macula = 0.55 * np.exp(-d2 / (2 * (0.75 * dd)**2)) + 0.45 * np.exp(-d2 / (2 * (0.2 * dd)**2))
  return img * np.exp(-macula[..., None] * _MACULA_ABSORBANCE)


def texture_cells() -> tuple[int, ...]:
  """Cell counts of the noise grids `background` expects, in order."""
  return tuple(c for c, _ in _TEXTURE_OCTAVES) + (_TESSELLATION_CELLS,)


def draw_disc(img: np.ndarray, geometry: Geometry, cup: dict, swelling: float,
              resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Draws the optic disc (rim and cup), optionally swollen (papilloedema).

  Args:
    img: float32 [H, W, 3] background.
    geometry: landmark positions.
    cup: {"cdr_v": vertical cup-to-disc ratio, "cdr_h": horizontal ratio, "offset": (dx, dy) of the
      cup centre as fractions of the disc radii}.
    swelling: 0 (normal) to 1 (florid papilloedema: larger, redder, blurred margin, no cup).
    resolution: side length.

  Returns:
    (image, disc mask, cup mask, veil [H, W] in [0, 1]: how much disc tissue hides the vessels,
    where they dive into the cup and, in papilloedema, across the swollen margin).
  """
  rx, ry = geometry.disc_radii
  grow = 1.0 + 0.5 * swelling
  # everything below vanishes beyond three (swollen) disc radii: work on that window only
  rows, cols = _window(geometry.disc, 3.0 * grow * max(rx, ry), resolution)
  gx, gy = raster.pixel_grid(resolution)
  x, y = gx[:, cols], gy[rows, :]
  q = _ellipse_field(x, y, geometry.disc, rx * grow, ry * grow)
  edge = (1.5 / raster.px_per_unit(resolution)) / rx + 0.08 + 0.45 * swelling  # margin width in q
  alpha = np.clip((1.0 - q) / edge + 0.5, 0.0, 1.0)
  # the rim is pinker at the margin and paler towards the cup
  depth = np.clip(q, 0.0, 1.0)[..., None]**2
  rim = (RIM_COLOUR * (1 - depth) + RIM_EDGE_COLOUR * depth) * (1 - swelling)
  rim = rim + SWOLLEN_DISC_COLOUR * swelling
  # light scattered from the bright disc makes a soft glow around it
  glow = 0.3 * np.exp(-np.maximum(q - 1.0, 0.0) / 0.25) * (1 - alpha)
  alpha = alpha + glow
  out = img.copy()
  patch = out[rows, cols]
  patch = patch * (1 - alpha[..., None]) + rim * alpha[..., None]
  centre = (geometry.disc[0] + cup["offset"][0] * rx, geometry.disc[1] + cup["offset"][1] * ry)
  qc = _ellipse_field(x, y, centre, cup["cdr_h"] * rx, cup["cdr_v"] * ry)
  cup_alpha = np.clip((1.0 - qc) / 0.35, 0.0, 1.0) * (1 - swelling)
  out[rows, cols] = patch * (1 - cup_alpha[..., None]) + CUP_COLOUR * cup_alpha[..., None]
  margin = np.exp(-((q - 1.0) / (0.25 + 0.3 * swelling))**2) * swelling
  core = np.exp(-(qc / 0.6)**2) * (1 - swelling)
  disc_mask = np.zeros((resolution, resolution), bool)
  cup_mask = np.zeros((resolution, resolution), bool)
  veil = np.zeros((resolution, resolution), np.float32)
  disc_mask[rows, cols] = q <= 1.0
  cup_mask[rows, cols] = (qc <= 1.0) & (swelling < 0.5)
  veil[rows, cols] = np.maximum(0.75 * margin, 0.6 * core)
  return out, disc_mask, cup_mask, veil


def _window(centre, radius: float, resolution: int) -> tuple[slice, slice]:
  """Row and column slices of the pixels within `radius` (normalised) of `centre`, clipped."""
  lo = np.floor((np.asarray(centre) - radius + 1.0) * raster.px_per_unit(resolution)).astype(int)
  hi = np.ceil((np.asarray(centre) + radius + 1.0) * raster.px_per_unit(resolution)).astype(int)
  lo, hi = np.clip(lo, 0, resolution), np.clip(hi, 0, resolution)
  return slice(lo[1], hi[1]), slice(lo[0], hi[0])


def vignette(img: np.ndarray, geometry: Geometry, strength: float, resolution: int):
  """Illumination fall-off towards the rim of the field of view, then the black surround.

  Args:
    img: float32 [H, W, 3].
    geometry: gives the field-of-view radius.
    strength: relative darkening at the rim (about 0.3 for a good photograph).
    resolution: side length.

  Returns:
    (image, fov mask bool [H, W]).
  """
  r = raster.radius_grid(resolution) / geometry.fov_radius
  # green and blue fall off a little faster than red towards the rim
  rc = np.minimum(r, 1.0)
  per_channel = np.array([1.0, 1.5, 1.5], np.float32)
  fall = 1.0 - strength * (rc * rc * np.sqrt(rc))[..., None] * per_channel  # r ** 2.5
  edge = np.clip((1.0 - r) * geometry.fov_radius * raster.px_per_unit(resolution) + 0.5, 0, 1)
  out = img * fall * edge[..., None]
  return out, r <= 1.0
