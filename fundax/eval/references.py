"""The reference sets every evaluation figure is read against: real phantoms and negative controls.

A metric of generated images cannot be read alone (DESIGN.md, "Measuring what the generator
draws"). For each figure fundax shows what real images score on the same number of images, and
what a known failure scores:

  * prompt-matched phantoms: for every prompt, as many phantom eyes as there are generated
    images, rendered with the facts the prompt states (`parse_caption`) as constraints, from a
    seed range no training set draws from. They are what a perfect generator would return for
    those prompts: the floor of the distances (FD, KID) and the diversity, the ceiling of the
    agreements (consistency, disc side, vessel ratio, precision, recall, C2ST at 0.5).
  * a second, disjoint prompt-matched set: the other side of the classifier two-sample test's
    floor (phantoms against phantoms).
  * negative controls derived from real phantoms, each a failure its metric must separate from
    the floor: Gaussian-blurred images (fidelity, vessels, C2ST), mirrored images (the disc on
    the wrong side), prompts shifted to other images (consistency), one image repeated for all
    of a prompt's samples (mode collapse: diversity), and noisy copies of training images
    (memorisation: the privacy audit).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from fundax.data import caption_parser
from fundax.data import phantom
from fundax.data import pipeline

log = logging.getLogger(__name__)

MATCHED_SEED = 600_000_000  # prompt-matched phantoms: prompt i, sample k -> seed + i * 1000 + k
SECOND_SEED = 650_000_000  # the second prompt-matched set (C2ST floor)
BLUR_SIGMA = 1 / 32  # Gaussian blur of the negative control, as a fraction of the image side
COPY_NOISE = 0.02  # std of the noise on training-image copies ([-1, 1] scale)
# Constraint groups tried in order when a prompt's facts contradict each other for the phantom
# (e.g. DME asked without exudate-bearing grades): the full set, then the fields every caption
# leads with, then none.
_CORE = ("laterality", "field", "quality", "dr_grade")


def prompt_constraints(prompt: str) -> dict:
  """The phantom constraints a prompt states (`phantom.sample_case` keywords)."""
  labels = caption_parser.parse_caption(prompt)
  constraints = {name: getattr(labels, name) for name in phantom.CONSTRAINTS
                 if getattr(labels, name, None) is not None}
  if "cdr" in constraints:
    constraints["cdr"] = float(np.clip(constraints["cdr"], 0.05, 0.95))
  return constraints


def _drawable(constraints: dict, seed: int) -> dict:
  """The largest of the constraint groups the phantom can draw (see _CORE)."""
  for group in (constraints, {k: v for k, v in constraints.items() if k in _CORE}, {}):
    try:
      phantom.sample_case(np.random.default_rng(seed), **group)
      return group
    except (ValueError, RuntimeError) as e:
      log.warning("prompt constraints %s cannot all be drawn (%s); dropping some", group, e)
  raise AssertionError("unreachable: the unconstrained phantom always renders")


def prompt_matched(prompts: Sequence[str], resolution: int, *, first_seed: int = MATCHED_SEED,
                   num_workers: int = 0):
  """One phantom per entry of `prompts`, drawn with the facts that prompt states.

  Args:
    prompts: N prompts, one per image to match (a prompt repeated k times gets k eyes).
    resolution: image side, px (below the phantom's smallest size, rendered there and shrunk).
    first_seed: seed range (MATCHED_SEED or SECOND_SEED; no training set draws from either):
      the k-th image of the i-th distinct prompt has seed first_seed + 1000 i + k.
    num_workers: rendering processes.

  Returns:
    (uint8 images [N, R, R, 3] aligned with `prompts`, their FundusLabels).
  """
  order = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
  groups = {p: _drawable(prompt_constraints(p), first_seed + 1000 * i) for p, i in order.items()}
  seen: dict[str, int] = {}
  seeds, constraints = [], []
  for prompt in prompts:
    k = seen[prompt] = seen.get(prompt, -1) + 1
    seeds.append(first_seed + 1000 * order[prompt] + k)
    constraints.append(groups[prompt])
  render = max(resolution, phantom.MIN_RESOLUTION)
  images, labels = phantom.generate_images(seeds, render, constraints, num_workers=num_workers)
  if render != resolution:
    images = np.stack([pipeline.resize(image, resolution) for image in images])
  return images, labels


def blurred(images: np.ndarray) -> np.ndarray:
  """Gaussian-blurred copies (sigma = BLUR_SIGMA of the side): vessels and lesions gone."""
  images = np.asarray(images)
  sigma = BLUR_SIGMA * images.shape[1]
  out = ndimage.gaussian_filter(images.astype(np.float32), (0, sigma, sigma, 0))
  return out.round().clip(0, 255).astype(np.uint8) if images.dtype == np.uint8 else out


def mirrored(images: np.ndarray) -> np.ndarray:
  """Left-right mirrored images: each eye turned into the other, against the same prompts."""
  return np.asarray(images)[:, :, ::-1]


def shifted_prompts(prompts: Sequence[str]) -> list[str]:
  """Each image's prompt replaced by the next distinct prompt (cyclically).

  No image keeps its own prompt (given two or more distinct ones), and each prompt's images
  stay together, so agreement falls to what two prompts share by chance.
  """
  distinct = list(dict.fromkeys(prompts))
  following = dict(zip(distinct, distinct[1:] + distinct[:1]))
  return [following[p] for p in prompts]


def collapsed(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
  """Mode collapse: every image replaced by the first image of its prompt."""
  first = {}
  for i, p in enumerate(prompts):
    first.setdefault(p, i)
  return np.asarray(images)[[first[p] for p in prompts]]


def noisy_copies(images: np.ndarray, num: int, seed: int = 0) -> np.ndarray:
  """`num` training images with a little pixel noise: memorisation the privacy audit flags.

  Args:
    images: float images in [-1, 1] (the training / reference set).
    num: copies to return (cycling through the images).
    seed: noise seed.

  Returns:
    float32 [num, H, W, 3] in [-1, 1].
  """
  images = np.asarray(images, np.float32)
  picks = images[np.arange(num) % len(images)]
  noise = np.random.default_rng(seed).normal(0, COPY_NOISE, picks.shape)
  return np.clip(picks + noise, -1, 1).astype(np.float32)
