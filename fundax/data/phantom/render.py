"""Rendering of a phantom case at a chosen resolution: the image, its masks, labels and record.

`render(case, resolution)` draws the layers in the order light meets them in a photograph
(background and macula, atrophy and drusen, disc, exudates, veins, arteries, new vessels,
haemorrhages, cotton-wool spots), then illumination fall-off, the black surround, the quality
defects and a little sensor noise. `generate(seed, resolution, **constraints)` is sample + render.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fundax.data import labels as labels_lib
from fundax.data.phantom import anatomy
from fundax.data.phantom import case as case_lib
from fundax.data.phantom import lesions
from fundax.data.phantom import quality
from fundax.data.phantom import raster
from fundax.data.phantom import vessels

MIN_RESOLUTION, MAX_RESOLUTION = 64, 1024
# Masks every sample carries: anatomy, the union of all lesions, then one mask per lesion kind.
MASK_NAMES = (("fov", "vessels", "arteries", "veins", "disc", "cup", "lesions") +
              lesions.LESION_MASKS)
# Per-channel absorbance of blood columns: veins carry darker, deoxygenated blood.
VEIN_ABSORBANCE = np.array([0.12, 0.6, 0.5], np.float32)
ARTERY_ABSORBANCE = np.array([0.04, 0.32, 0.27], np.float32)
ARTERY_REFLEX = 0.12  # central light reflex of arteries (fraction of the pixel brightened)
SENSOR_NOISE = 0.008  # per-pixel noise std, display units
OPTICAL_BLUR = 0.0022  # point-spread width of a good fundus camera, normalised units
# Blob findings in drawing order (deep to superficial); vascular lesions go between them.
_DEEP = ("geographic_atrophy", "drusen", "pigment_change")
_SUPERFICIAL = ("microaneurysms", "dot_blot_haemorrhages", "flame_haemorrhages",
                "disc_haemorrhage", "cotton_wool_spots")


@dataclasses.dataclass(frozen=True)
class PhantomSample:
  """One rendered phantom photograph with its ground truth."""

  image: np.ndarray  # uint8 [H, W, 3]
  masks: dict[str, np.ndarray]  # MASK_NAMES -> bool [H, W]
  # How opaque each pixel's arteries and veins are where the image shows them (inside the
  # field, not under the cup or a swollen disc margin): the anti-aliased coverage times the
  # cylindrical profile that darkens the image, float32 [H, W, 2] (arteries, veins) in [0, 1].
  # Unlike the masks, which draw a vessel narrower than a pixel a pixel wide, it keeps the
  # sub-pixel calibre (bench/ht_signal.py).
  vessel_opacity: np.ndarray
  labels: labels_lib.FundusLabels
  record: dict[str, Any]  # JSON-serialisable: every parameter, lesion positions, labels


def _check_resolution(resolution):
  if not (isinstance(resolution, (int, np.integer)) and
          MIN_RESOLUTION <= resolution <= MAX_RESOLUTION):
    raise ValueError(f"resolution must be an int in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], "
                     f"got {resolution!r}")


def render(case: case_lib.Case, resolution: int) -> PhantomSample:
  """Draws a case.

  Args:
    case: from sample_case.
    resolution: image side length in pixels, 64 to 1024.

  Returns:
    The PhantomSample.

  Raises:
    ValueError: for a resolution outside [64, 1024].
  """
  _check_resolution(resolution)
  info, geo = case.params, case.geometry
  masks = {}
  img = anatomy.background(geo, info["pigmentation"], info["tessellation"], list(case.texture),
                           resolution)
  choroid = None
  if len(case.blobs["geographic_atrophy"]):  # the same choroid that shows as tessellation
    choroid = np.clip(1.0 - 3.0 * np.abs(raster.smooth_noise(case.texture[-1], resolution)), 0, 1)
  for f in _DEEP:
    img, masks[f] = lesions.draw_blobs(img, f, case.blobs[f], resolution, choroid)
  img, masks["disc"], masks["cup"], veil = anatomy.draw_disc(
      img, geo, info["cup"], info["papilloedema"], resolution)
  img, masks["hard_exudates"] = lesions.draw_blobs(img, "hard_exudates",
                                                   case.blobs["hard_exudates"], resolution)
  hide = (1.0 - veil)[..., None]  # vessels dive into the cup / under a swollen margin
  vein_op, masks["veins"] = vessels.draw(case.veins, resolution)
  art_op, masks["arteries"] = vessels.draw(case.arteries, resolution)
  img = img * np.exp(-(vein_op[..., None] * VEIN_ABSORBANCE +
                       art_op[..., None] * ARTERY_ABSORBANCE) * hide)
  if art_op.max() > 0.9:
    # the reflex shows only along the axis of arteries wide enough to be fully opaque there
    img = img * (1 + ARTERY_REFLEX * np.clip(art_op - 0.9, 0, 1)[..., None] * 10 * hide)
  for f in case_lib.SEGMENT_FINDINGS:
    img, masks[f] = lesions.draw_vascular(img, case.segments[f], resolution)
  for f in _SUPERFICIAL:
    img, masks[f] = lesions.draw_blobs(img, f, case.blobs[f], resolution)
  img = raster.blur(img, OPTICAL_BLUR, resolution)
  img, fov = anatomy.vignette(img, geo, info["vignetting"], resolution)
  img = quality.apply_defects(img, fov, case.defects, geo.fov_radius, resolution)
  noise_rng = np.random.default_rng([*info["tree_seeds"], resolution])
  img = img + SENSOR_NOISE * noise_rng.standard_normal(img.shape, np.float32) * fov[..., None]
  image = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
  shown = hide[..., 0] * fov  # the vessels the image shows: the same veil, inside the field
  opacity = np.stack([art_op * shown, vein_op * shown], -1).astype(np.float32)
  return PhantomSample(image=image, masks=_masks(masks, fov), vessel_opacity=opacity,
                       labels=case.labels(),
                       record=case.record() | {"resolution": int(resolution)})


def _masks(drawn: dict[str, np.ndarray], fov: np.ndarray) -> dict[str, np.ndarray]:
  out = {"fov": fov}
  for name in ("arteries", "veins", "disc", "cup"):
    out[name] = drawn[name] & fov
  out["vessels"] = out["arteries"] | out["veins"]
  for name in lesions.LESION_MASKS:
    out[name] = np.zeros_like(fov)
  for finding, name in lesions.MASK_OF.items():
    out[name] = out[name] | (drawn[finding] & fov)
  out["lesions"] = np.logical_or.reduce([out[n] for n in lesions.LESION_MASKS])
  return {name: out[name] for name in MASK_NAMES}


def generate(seed: int, resolution: int = 128, **constraints) -> PhantomSample:
  """Samples a case from `np.random.default_rng(seed)` and renders it.

  Args:
    seed: case seed; the same seed and constraints give the same eye at every resolution.
    resolution: image side length, 64 to 1024.
    **constraints: see case.sample_case.

  Returns:
    The PhantomSample.
  """
  _check_resolution(resolution)
  return render(case_lib.sample_case(np.random.default_rng(seed), **constraints), resolution)


def _image_and_labels(args) -> tuple[np.ndarray, str]:
  seed, resolution, constraints = args
  sample = generate(seed, resolution, **constraints)
  return sample.image, sample.labels.to_json()


def generate_images(seeds, resolution: int, constraints=None, *, num_workers: int = 0,
                    progress=None) -> tuple[np.ndarray, list[labels_lib.FundusLabels]]:
  """Renders many phantoms, keeping only their images and labels (no masks, no records).

  Args:
    seeds: case seeds.
    resolution: image side length, 64 to 1024.
    constraints: None, or one constraints dict (see case.sample_case) per seed.
    num_workers: processes that render (0 or 1: this process). The images do not depend on
      it. Processes are spawned, not forked: forking a process that runs JAX can deadlock.
      A spawned process imports the calling script again, so a script calls this under
      `if __name__ == "__main__":`; without it the workers die starting and this raises.
    progress: optional callable wrapping the result iterator (e.g. a tqdm factory).

  Returns:
    (uint8 images [N, resolution, resolution, 3], the N FundusLabels).

  Raises:
    RuntimeError: a rendering process died (e.g. the unguarded script above).
  """
  import concurrent.futures  # pylint: disable=g-import-not-at-top  (only this path needs them)
  import multiprocessing  # pylint: disable=g-import-not-at-top
  _check_resolution(resolution)
  seeds = [int(s) for s in seeds]
  constraints = [{}] * len(seeds) if constraints is None else list(constraints)
  if len(constraints) != len(seeds):
    raise ValueError(f"{len(seeds)} seeds but {len(constraints)} constraint sets")
  args = list(zip(seeds, [resolution] * len(seeds), constraints))
  wrap = progress or (lambda it, total: it)

  def collect(results):
    images = np.empty((len(args), resolution, resolution, 3), np.uint8)
    labels = []
    for i, (image, label) in enumerate(wrap(results, len(args))):
      images[i] = image
      labels.append(labels_lib.FundusLabels.from_json(label))
    return images, labels

  if num_workers <= 1:
    return collect(map(_image_and_labels, args))
  # An executor, not multiprocessing.Pool: a Pool replaces a worker that dies on start-up
  # forever (a hang); the executor reports it.
  with concurrent.futures.ProcessPoolExecutor(
      num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    try:
      return collect(pool.map(_image_and_labels, args, chunksize=16))
    except concurrent.futures.process.BrokenProcessPool as e:
      raise RuntimeError(
          "a phantom rendering process died; a script that renders with num_workers > 1 must "
          "call it under `if __name__ == \"__main__\":` (spawned workers import the script "
          "again)") from e
