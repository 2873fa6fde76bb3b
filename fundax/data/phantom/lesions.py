"""Drawing of the phantom's lesions: each finding's layer, its colour, and its mask.

Dark lesions (haemorrhages, microaneurysms, pigment, new vessels) absorb light, so they multiply
the image by exp(-value * absorbance); bright lesions (exudates, cotton-wool spots, drusen,
atrophy) are blended towards their own colour. Each function returns the new image and the
lesion's boolean mask.
"""

from __future__ import annotations

import numpy as np

from fundax.data.phantom import raster

# Per-channel absorbance (R, G, B) of dark lesions at full strength.
HAEMORRHAGE_ABSORBANCE = np.array([0.4, 1.2, 1.25], np.float32)
MICROANEURYSM_ABSORBANCE = np.array([0.45, 1.3, 1.35], np.float32)
PIGMENT_ABSORBANCE = np.array([1.3, 1.2, 1.0], np.float32)
NEW_VESSEL_ABSORBANCE = np.array([0.2, 0.8, 0.65], np.float32)
# Colours bright lesions are blended towards, and the blend weight at full strength.
EXUDATE_COLOUR, EXUDATE_WEIGHT = np.array([1.0, 0.86, 0.38], np.float32), 0.9
COTTON_WOOL_COLOUR, COTTON_WOOL_WEIGHT = np.array([0.97, 0.86, 0.78], np.float32), 0.8
DRUSEN_COLOUR, DRUSEN_WEIGHT = np.array([1.0, 0.76, 0.45], np.float32), 0.75
ATROPHY_COLOUR, ATROPHY_WEIGHT = np.array([0.97, 0.72, 0.56], np.float32), 0.85

# How each blob finding is drawn: (softness, dome, irregularity, kind, colour or absorbance,
# weight).
BLOB_STYLE = {
    "microaneurysms": (0.0, 0.3, 0.0, "dark", MICROANEURYSM_ABSORBANCE, 1.0),
    "dot_blot_haemorrhages": (0.5, 0.2, 0.12, "dark", HAEMORRHAGE_ABSORBANCE, 1.0),
    "flame_haemorrhages": (0.5, 0.3, 0.1, "dark", HAEMORRHAGE_ABSORBANCE, 1.0),
    "disc_haemorrhage": (0.5, 0.3, 0.1, "dark", HAEMORRHAGE_ABSORBANCE, 1.0),
    "pigment_change": (0.5, 0.0, 0.15, "dark", PIGMENT_ABSORBANCE, 1.0),
    "hard_exudates": (0.3, 0.4, 0.2, "bright", EXUDATE_COLOUR, EXUDATE_WEIGHT),
    "cotton_wool_spots": (0.9, 0.6, 0.15, "bright", COTTON_WOOL_COLOUR, COTTON_WOOL_WEIGHT),
    "drusen": (0.7, 0.8, 0.05, "bright", DRUSEN_COLOUR, DRUSEN_WEIGHT),
    "geographic_atrophy": (0.25, 0.0, 0.2, "bright", ATROPHY_COLOUR, ATROPHY_WEIGHT),
}
# Mask name of each finding (several findings share a mask).
MASK_OF = {
    "microaneurysms": "microaneurysms",
    "dot_blot_haemorrhages": "haemorrhages",
    "flame_haemorrhages": "haemorrhages",
    "disc_haemorrhage": "haemorrhages",
    "pigment_change": "pigment",
    "hard_exudates": "exudates",
    "cotton_wool_spots": "cotton_wool",
    "drusen": "drusen",
    "geographic_atrophy": "atrophy",
    "neovascularisation": "neovascularisation",
    "irma": "irma",
}
LESION_MASKS = tuple(dict.fromkeys(MASK_OF.values()))


def draw_blobs(img: np.ndarray, finding: str, blobs: np.ndarray, resolution: int,
               choroid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Draws one blob finding onto the image.

  Args:
    img: float32 [H, W, 3].
    finding: a key of BLOB_STYLE.
    blobs: [n, 6] lesion array (pathology.BLOB_COLUMNS).
    resolution: side length.
    choroid: [H, W] stripe pattern in [0, 1] that shows through atrophy (large choroidal
      vessels become visible where the pigment epithelium is gone); used for atrophy only.

  Returns:
    (image, mask bool [H, W]).
  """
  if not len(blobs):
    return img, np.zeros(img.shape[:2], bool)
  softness, dome, irregularity, kind, colour, weight = BLOB_STYLE[finding]
  value, mask = raster.draw_ellipses(blobs[:, :2], blobs[:, 2:4], blobs[:, 4], blobs[:, 5],
                                     resolution, softness=softness, dome=dome,
                                     irregularity=irregularity)
  v = value[..., None]
  if kind == "dark":
    return img * np.exp(-v * colour), mask
  target = colour
  if choroid is not None:
    target = colour * (1.0 - 0.35 * choroid[..., None] * np.array([0.2, 1.0, 1.0], np.float32))
  return img * (1 - weight * v) + target * (weight * v), mask


def draw_vascular(img: np.ndarray, segments: np.ndarray,
                  resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """Draws fine new vessels or intraretinal microvascular abnormalities.

  Args:
    img: float32 [H, W, 3].
    segments: [m, 7] capsule segments (pathology.SEGMENT_COLUMNS).
    resolution: side length.

  Returns:
    (image, mask bool [H, W]).
  """
  if not len(segments):
    return img, np.zeros(img.shape[:2], bool)
  opacity, mask = raster.draw_segments(segments[:, 0:2], segments[:, 2:4], segments[:, 4],
                                       segments[:, 5], resolution)
  return img * np.exp(-opacity[..., None] * NEW_VESSEL_ABSORBANCE), mask
