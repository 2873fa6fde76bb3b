"""Image-quality defects of the phantom and the EyeQ-style grade they imply.

Each defect has a severity in [0.2, 1]. The grade follows from the severities alone
(`grade_quality`): no defect is "good"; defects that leave the retina gradable are "usable";
one severe defect, or two marked ones, make the image "reject". Defects are applied to the
rendered image with parameters in normalised units, so they look the same at any resolution
(off-centre framing is a shift of the anatomy and is applied when the geometry is placed).
"""

from __future__ import annotations

import numpy as np

from fundax.data import labels as labels_lib
from fundax.data.phantom import raster

MIN_SEVERITY = 0.2  # a listed defect is at least this severe; below it there is no defect
REJECT_SEVERITY = 0.6  # one defect this severe makes the image ungradable
MARKED_SEVERITY = 0.4  # two defects at least this severe also make it ungradable
# Severity ranges used when a grade is requested.
_SEVERITY_RANGE = {"usable": (MIN_SEVERITY, 0.39), "reject": (REJECT_SEVERITY, 1.0)}


def grade_quality(severities: dict[str, float]) -> str:
  """EyeQ grade from defect severities.

  Args:
    severities: defect name (labels.QUALITY_DEFECTS) -> severity in [0, 1].

  Returns:
    "good", "usable" or "reject".
  """
  s = sorted((v for v in severities.values() if v >= MIN_SEVERITY), reverse=True)
  if not s:
    return "good"
  if s[0] >= REJECT_SEVERITY or (len(s) > 1 and s[1] >= MARKED_SEVERITY):
    return "reject"
  return "usable"


def sample_defects(rng: np.random.Generator, quality: str,
                   defects: tuple[str, ...] | None = None) -> dict[str, dict]:
  """Chooses defects (and their drawing parameters) for a requested grade.

  Args:
    rng: randomness.
    quality: the grade the defects must produce.
    defects: which defects to use; None picks one or two at random (none for "good").

  Returns:
    defect name -> {"severity": float, ...drawing parameters}; grade_quality of the severities
    equals `quality`.
  """
  if quality == "good":
    if defects:
      raise ValueError(f"quality_defects {defects} contradict quality='good'")
    return {}
  if defects is None:
    k = 1 if quality == "usable" or rng.random() < 0.7 else 2
    defects = tuple(rng.choice(labels_lib.QUALITY_DEFECTS, k, replace=False))
  if not defects:
    raise ValueError(f"quality={quality!r} needs at least one quality_defect")
  lo, hi = _SEVERITY_RANGE[quality]
  sev = rng.uniform(lo, hi, len(defects))
  if quality == "reject":  # one defect decides; the others may be milder
    sev[1:] = rng.uniform(MIN_SEVERITY, hi, len(defects) - 1)
  out = {}
  for name, s in zip(defects, sev):
    angle = rng.uniform(0, 2 * np.pi)
    out[str(name)] = {"severity": float(s), "angle": float(angle),
                      "spots": rng.uniform(-0.8, 0.8, (int(rng.integers(3, 10)), 2)).tolist(),
                      "seed": int(rng.integers(2**31))}
  return out


def apply_defects(img: np.ndarray, fov: np.ndarray, defects: dict[str, dict], fov_radius: float,
                  resolution: int) -> np.ndarray:
  """Degrades a rendered image (float RGB [H, W, 3] in [0, 1]) by the given defects.

  Args:
    img: the clean image, black outside the field of view.
    fov: bool [H, W] field-of-view mask.
    defects: from `sample_defects`.
    fov_radius: radius of the field of view, normalised.
    resolution: side length.

  Returns:
    The degraded float32 image, clipped to [0, 1].
  """
  x, y = raster.pixel_grid(resolution)
  inside = fov[..., None].astype(np.float32)
  for name in labels_lib.QUALITY_DEFECTS:  # a fixed order keeps the result deterministic
    if name not in defects:
      continue
    d = defects[name]
    s, a = d["severity"], d["angle"]
    ramp = (x * np.cos(a) + y * np.sin(a)) / fov_radius  # -1 .. 1 across the field
    if name == "defocus":
      img = raster.blur(img, 0.002 + 0.018 * s, resolution) * inside
    elif name == "uneven_illumination":
      gain = np.exp(0.9 * s * ramp)[..., None]
      haze = (0.35 * s * np.clip(ramp, 0, 1)**2)[..., None] * np.array([1.0, 0.8, 0.6])
      img = (img * gain + haze) * inside
    elif name == "underexposure":
      img = img * (1.0 - 0.75 * s)
    elif name == "overexposure":
      img = (1.0 - (1.0 - np.clip(img * (1 + 0.8 * s), 0, 1)) * (1 - 0.6 * s)) * inside
    elif name == "off_centre":
      # part of the field falls outside the pupil: a dark crescent on one side
      r = np.hypot(x, y) / fov_radius
      shade = np.clip((r - 0.55) / 0.45, 0, 1) * np.clip(ramp, 0, 1)
      img = img * (1.0 - 0.95 * s * shade)[..., None]
    elif name == "eyelash_artifact":
      img = _eyelashes(img, inside, s, a, d["seed"], fov_radius, resolution)
    elif name == "dust_artifact":
      spots = np.asarray(d["spots"]) * fov_radius
      n = len(spots)
      radii = np.repeat(np.linspace(0.03, 0.06, n)[:, None], 2, axis=1)
      val, _ = raster.draw_ellipses(spots, radii, np.zeros(n), np.full(n, 1.0), resolution,
                                    softness=0.8, dome=0.5)
      img = img * (1.0 - 0.6 * s * val[..., None])
  return np.clip(img, 0.0, 1.0).astype(np.float32)


def _eyelashes(img, inside, s, angle, seed, fov_radius, resolution):
  """Blurred dark lash shadows and bright reflections across one edge of the field."""
  rng = np.random.default_rng(seed)
  n = 5 + int(8 * s)
  edge = np.array([np.cos(angle), np.sin(angle)]) * fov_radius * 0.8
  along = np.array([-np.sin(angle), np.cos(angle)])
  centres = edge + along * rng.uniform(-0.6, 0.6, (n, 1)) - edge * rng.uniform(0, 0.4 * s, (n, 1))
  lengths = rng.uniform(0.25, 0.55, n)
  radii = np.c_[lengths, np.full(n, 0.015 + 0.03 * s)]
  # lashes are out-of-focus streaks reaching in from the edge of the field
  val, _ = raster.draw_ellipses(centres, radii, angle + rng.normal(0, 0.5, n), np.ones(n),
                                resolution, softness=0.8)
  val = raster.blur(val, 0.01 + 0.02 * s, resolution)[..., None]
  glow = np.array([0.9, 0.75, 0.6]) * 0.5 * s
  return img * (1.0 - 0.7 * s * val) + glow * val * inside
