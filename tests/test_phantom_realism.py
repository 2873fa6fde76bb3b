"""Realism of the phantom against a real colour fundus photograph (skimage.data.retina()).

Eight good-quality, healthy, medium-pigmented phantoms (the real photograph is a healthy,
medium-pigmented eye) are measured at 384 px with the same statistics as the photograph resized
to 384 px: colour distribution inside the field of view, the fraction of pixels a standard
vesselness filter (Sato, on the green channel, same threshold) calls vessel, and how much
brighter the optic disc is than the fundus. Run with -s to see the figures.
"""

import numpy as np
import pytest
from scipy import ndimage
from skimage import data
from skimage import filters
from skimage import transform

from fundax.data import phantom

RESOLUTION = 384
NUM_PHANTOMS = 8
HEALTHY = dict(dr_grade=0, amd_stage=0, hypertensive_grade=0, glaucoma=False, quality="good",
               pigmentation="medium")
# Fundus colour differs between cameras and eyes by far more than this; 10 % against one
# photograph of the same kind of eye still catches a wrong palette (a pink or brown fundus is off
# by > 20 % in green or blue).
MEAN_RTOL = 0.10
# Green-to-red ratio, the main cue of a fundus's colour: same reasoning, 10 %.
GREEN_RED_RTOL = 0.10
# Spread of each channel inside the field (texture, vessels, vignetting, macula): 30 %, since the
# photograph's spread also carries its nerve-fibre sheen and camera noise, which we model loosely.
STD_RTOL = 0.30
# Vessel-pixel fraction from the Sato filter: 35 %; vessel density varies by about this much
# between healthy eyes, and more than that would mean a visibly sparse or cluttered tree.
VESSEL_FRACTION_RTOL = 0.35
SATO_SIGMAS = (1, 2, 3)
SATO_THRESHOLD = 0.02
# Brightest disc-sized region over the median fundus brightness: 20 %.
DISC_RATIO_RTOL = 0.20


def measure(image: np.ndarray) -> dict[str, float]:
  """Statistics of a uint8 / float-255 RGB fundus image [N, N, 3]; FOV found by thresholding."""
  img = image.astype(np.float64)
  n = img.shape[0]
  fov = ndimage.binary_erosion(img.sum(-1) > 40, iterations=n // 50)  # drop the dark rim
  stats = {}
  for c, name in enumerate("RGB"):
    stats[f"mean_{name}"] = img[..., c][fov].mean()
    stats[f"std_{name}"] = img[..., c][fov].std()
  stats["green_red"] = stats["mean_G"] / stats["mean_R"]
  vesselness = filters.sato(img[..., 1] / 255.0, sigmas=SATO_SIGMAS, black_ridges=True)
  stats["vessel_fraction"] = (vesselness[fov] > SATO_THRESHOLD).mean()
  grey = img.mean(-1)
  smooth = filters.gaussian(grey, n / 100)
  y, x = np.unravel_index(np.argmax(np.where(fov, smooth, 0)), grey.shape)
  yy, xx = np.ogrid[:n, :n]
  disc = (yy - y)**2 + (xx - x)**2 <= (0.03 * n)**2  # a disc-sized patch at the brightest spot
  stats["disc_ratio"] = grey[disc].mean() / np.median(grey[fov])
  return stats


@pytest.fixture(scope="module")
def figures():
  real = transform.resize(data.retina(), (RESOLUTION, RESOLUTION), anti_aliasing=True) * 255
  ours = [measure(phantom.generate(seed, RESOLUTION, **HEALTHY).image)
          for seed in range(NUM_PHANTOMS)]
  synthetic = {k: float(np.mean([s[k] for s in ours])) for k in ours[0]}
  real = {k: float(v) for k, v in measure(real).items()}
  for k in real:
    print(f"{k:16s} retina {real[k]:8.3f}  phantom {synthetic[k]:8.3f}  "
          f"({synthetic[k] / real[k] - 1:+.1%})")
  return real, synthetic


def _close(figures, key, rtol):
  real, synthetic = figures
  assert abs(synthetic[key] / real[key] - 1) <= rtol, (key, real[key], synthetic[key])


@pytest.mark.parametrize("channel", "RGB")
def test_colour_inside_field(figures, channel):
  _close(figures, f"mean_{channel}", MEAN_RTOL)
  _close(figures, f"std_{channel}", STD_RTOL)


def test_green_red_ratio(figures):
  _close(figures, "green_red", GREEN_RED_RTOL)


def test_vessel_fraction(figures):
  _close(figures, "vessel_fraction", VESSEL_FRACTION_RTOL)


def test_disc_brightness(figures):
  _close(figures, "disc_ratio", DISC_RATIO_RTOL)
