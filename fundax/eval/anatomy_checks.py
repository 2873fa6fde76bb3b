"""Anatomical plausibility checks that need no trained network, validated on the phantom.

  * Vessel density: the fraction of field-of-view pixels that a standard multi-scale vesselness
    filter (Frangi et al. 1998, on the inverted green channel, where vessels are dark ridges)
    marks as vessel. On phantom images the detection is scored against the drawn vessel mask;
    on generated images its distribution is compared with the reference set's.
  * Optic disc side: the brightest large blob (heavily smoothed luminance maximum) should sit on
    the side the prompt's laterality says. In fundus photographs as displayed (and in the
    phantom), a right eye's disc is on the right half of a macula-centred image, a left eye's on
    the left half. Disc-centred images put the disc near the middle, so they are not scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage import filters

from fundax.data import captions

FOV_THRESHOLD = 0.15  # fraction of max luminance separating the FOV from the black border
# Frangi response (green channel on a [0, 1] scale) above which a pixel counts as vessel; an
# absolute threshold, so that density can differ between images. Chosen on phantom images at
# 128 px, where it gives Dice ~0.7-0.8 against the drawn vessel mask.
VESSEL_THRESHOLD = 0.02


def _unit(image) -> np.ndarray:
  """[H, W, 3] uint8 or float in [-1, 1] -> float64 in [0, 1]."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image.astype(np.float64) / 255.0
  return (np.asarray(image, np.float64) + 1.0) / 2.0


def fov_mask(image) -> np.ndarray:
  """The circular field of view: smoothed luminance above a fraction of its maximum, [H, W]."""
  lum = ndimage.uniform_filter(_unit(image).mean(-1), size=3)
  return lum > FOV_THRESHOLD * lum.max()


def vessel_map(image, fov: np.ndarray | None = None) -> np.ndarray:
  """Boolean [H, W] vessel detection inside the field of view.

  Args:
    image: [H, W, 3] image (uint8 or float in [-1, 1]).
    fov: optional [H, W] field-of-view mask (detected when not given).

  Returns:
    Pixels of the (slightly eroded) FOV whose Frangi response exceeds VESSEL_THRESHOLD.
  """
  fov = fov_mask(image) if fov is None else fov
  # An eroded FOV keeps the bright rim of the border from being read as a dark ridge.
  inner = ndimage.binary_erosion(fov, iterations=max(1, image.shape[0] // 32))
  green = _unit(image)[..., 1]
  scale = image.shape[0] / 128.0
  response = filters.frangi(green, sigmas=np.array([0.75, 1.0, 1.5, 2.0]) * max(scale, 1.0),
                            black_ridges=True)
  return (response > VESSEL_THRESHOLD) & inner


def vessel_density(image) -> float:
  """Fraction of field-of-view pixels detected as vessel."""
  fov = fov_mask(image)
  return float(vessel_map(image, fov).sum() / max(fov.sum(), 1))


def vessel_agreement(image, vessel_mask) -> dict[str, float]:
  """Detected vessels against a ground-truth mask (the phantom's), inside the FOV.

  Args:
    image: [H, W, 3] image.
    vessel_mask: [H, W] boolean ground-truth vessels.

  Returns:
    {"dice", "detected_density", "true_density"}.
  """
  fov = fov_mask(image)
  detected, truth = vessel_map(image, fov), np.asarray(vessel_mask, bool) & fov
  inter = (detected & truth).sum()
  return {"dice": float(2 * inter / max(detected.sum() + truth.sum(), 1)),
          "detected_density": float(detected.sum() / max(fov.sum(), 1)),
          "true_density": float(truth.sum() / max(fov.sum(), 1))}


def disc_side(image) -> str:
  """"right" or "left": the half of the image holding the brightest smoothed blob."""
  lum = _unit(image).mean(-1)
  smooth = ndimage.gaussian_filter(np.where(fov_mask(image), lum, 0.0), sigma=image.shape[1] / 24)
  _, x = np.unravel_index(np.argmax(smooth), smooth.shape)
  return "right" if x >= image.shape[1] / 2 else "left"


def disc_side_agreement(images, prompts: Sequence[str]) -> dict:
  """How often the detected disc side matches the laterality each prompt asks for.

  Args:
    images: [N, H, W, 3].
    prompts: N prompts; those without a laterality, or asking for a disc-centred field, are
      skipped.

  Returns:
    {"n": scored images, "accuracy": fraction agreeing (NaN when none scored)}.
  """
  hits = []
  for image, prompt in zip(images, prompts):
    asked = captions.parse_caption(prompt)
    if asked.laterality is None or asked.field == "disc":
      continue
    hits.append(disc_side(image) == asked.laterality)
  return {"n": len(hits), "accuracy": float(np.mean(hits)) if hits else float("nan")}


def vessel_density_comparison(images, reference_images) -> dict:
  """Vessel densities of generated and reference images, their means and the difference.

  Returns:
    {"generated": [N], "reference": [M], "generated_mean", "reference_mean",
    "abs_difference"}.
  """
  gen = [vessel_density(x) for x in images]
  ref = [vessel_density(x) for x in reference_images]
  return {"generated": gen, "reference": ref, "generated_mean": float(np.mean(gen)),
          "reference_mean": float(np.mean(ref)),
          "abs_difference": float(abs(np.mean(gen) - np.mean(ref)))}
