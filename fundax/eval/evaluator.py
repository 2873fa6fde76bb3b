"""The independent fundus evaluator: a small multi-task ResNet trained by fundax on phantom data.

It grades an image the way a reading centre would (DR grade, DME, cup-to-disc ratio, AMD stage,
hypertensive grade, image quality, laterality) and its pooled last layer is the feature space
for the fidelity and privacy metrics.

Independence from the Selector. The generator is optimised against the Selector (the reward
model trained on human ratings), so only a judge it never saw can tell whether it gamed it.
The evaluator therefore shares nothing with the Selector:
  * weights: a different network (CoordConv and local-contrast inputs, average + max pooling,
    one head per attribute) initialised from its own seed; `load_evaluator` reads only
    params directories of kind "evaluator", never a Selector run;
  * targets: phantom ground-truth labels, never ratings or Selector scores;
  * images: phantom seeds from configs/evaluator.py `data.first_seed` (900 000 000) on, a range
    disjoint from the Selector's graded (100 000 on) and simulated-rating (500 000 on) seeds
    and from the phantom dataset splits the generator learns from
    (tests/test_eval_evaluator.py checks the ranges of both configs' variants).

Layout on disk (written and read by fundax.interop.params_io, kind "evaluator"), so that an
evaluator directory describes itself:
```
evaluator_dir/config.json  {"kind": "evaluator", "config": {width, stage_sizes, heads,
                            resolution, ...}, "train_config": {...}, "heldout": {...}}
evaluator_dir/params/      Orbax checkpoint of the params
```
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fundax import parallel
from fundax.data import labels as labels_lib
from fundax.eval import consistency
from fundax.interop import params_io

KIND = "evaluator"
# Head name -> outputs: class count for categorical heads, 1 for the cup-to-disc regression.
HEADS = {"dr_grade": 5, "dme": 2, "cdr": 1, "amd_stage": 4, "hypertensive_grade": 5,
         "quality": 3, "laterality": 2, "field": 2}
REGRESSION_HEADS = ("cdr",)
GLAUCOMA_CDR = 0.65  # a predicted CDR at least this reads as a glaucomatous disc (the phantom's)
# The held-out score (heldout.json key, bar) an attribute's reading must reach to count in
# prompt consistency at the evaluator's resolution: clearly better than a constant guess.
# Below it (e.g. hypertensive signs that are sub-pixel at 64 px) the attribute is still
# measured and shown, but not scored, so consistency does not count noise.
READABLE = {"laterality": ("laterality_accuracy", 0.9), "field": ("field_accuracy", 0.9),
            "quality": ("quality_qwk", 0.6), "dr_grade": ("dr_grade_qwk", 0.5),
            "dme": ("dme_auroc", 0.75), "amd_stage": ("amd_stage_auroc", 0.75),
            "hypertensive_grade": ("hypertensive_grade_auroc", 0.75),
            "glaucoma": ("glaucoma_auroc", 0.75), "cdr": ("cdr_accuracy", 0.75)}


def readable_attributes(heldout: Mapping[str, float]) -> tuple[str, ...]:
  """The attributes whose held-out score meets its READABLE bar (a missing score fails)."""
  return tuple(name for name, (key, bar) in READABLE.items()
               if np.isfinite(heldout.get(key, np.nan)) and heldout[key] >= bar)


class ResidualBlock(nn.Module):
  """Pre-activation residual block (GroupNorm, so there are no batch statistics to carry)."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    groups = min(8, self.features)
    y = nn.swish(nn.GroupNorm(num_groups=min(8, x.shape[-1]), dtype=self.dtype)(x))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), (self.strides, self.strides), dtype=self.dtype,
                         name="proj")(y)
    y = nn.Conv(self.features, (3, 3), (self.strides, self.strides), dtype=self.dtype)(y)
    y = nn.swish(nn.GroupNorm(num_groups=groups, dtype=self.dtype)(y))
    y = nn.Conv(self.features, (3, 3), dtype=self.dtype)(y)
    return shortcut + y


class FundusEvaluator(nn.Module):
  """Multi-task CNN: NHWC images in [-1, 1] -> ({head: logits}, features [N, D]).

  The heads read the pooled last stage; the features (for FD, KID, precision/recall and the
  privacy audit) add the first stage's mean and standard deviation per channel.

  Attributes:
    width: channels of the first stage; each later stage doubles it.
    stage_sizes: residual blocks per stage; every stage after the first halves the resolution.
    stem_stride: the stem's stride; s > 1 makes it an s x s patchify convolution, so every
      stage runs at 1/s of the input side. XLA:CPU runs convolutions of few channels at full
      resolution slowly (a width-16 stem at 64 px dominated the step), and a patchify stem
      loses nothing the heads need: each stem output sees all s x s pixels of its patch.
    heads: (head name, number of outputs) pairs (a subset of HEADS, or a custom task); a
      tuple so the module stays hashable (it is a static argument of the jitted `apply`).
    dtype: compute dtype.
  """
  width: int = 32
  stage_sizes: Sequence[int] = (1, 1, 1, 1)
  heads: tuple[tuple[str, int], ...] = tuple(HEADS.items())
  contrast: bool = True
  max_pool: bool = True
  stem_stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    n, h, w, _ = images.shape
    # Coordinate channels (CoordConv): global average pooling forgets where things are, and
    # laterality is exactly where the optic disc is.
    ys, xs = jnp.meshgrid(jnp.linspace(-1, 1, h), jnp.linspace(-1, 1, w), indexing="ij")
    coords = jnp.broadcast_to(jnp.stack([ys, xs], -1), (n, h, w, 2)).astype(images.dtype)
    parts = [images, coords]
    if self.contrast:
      parts.append(local_contrast(images))
    x = jnp.concatenate(parts, -1)  # [N, H, W, 5 or 8]
    if self.stem_stride == 1:
      x = nn.Conv(self.width, (3, 3), dtype=self.dtype, name="stem")(x)  # [N, H, W, w]
    else:  # patchify: every input pixel reaches the stem, at 1/stride^2 of the cost after it
      s = self.stem_stride
      x = nn.Conv(self.width, (s, s), (s, s), dtype=self.dtype, name="stem")(x)
    texture = None
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        x = ResidualBlock(self.width * 2 ** i, strides=2 if i > 0 and j == 0 else 1,
                          dtype=self.dtype)(x)
      if i == 0:
        # The first stage's activation statistics: fine texture (vessels, lesions, noise,
        # blur) that the pooled last stage, trained for clinical grades, barely encodes.
        texture = jnp.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], -1)
    x = nn.swish(nn.GroupNorm(num_groups=8, dtype=self.dtype)(x))
    pooled = [x.mean(axis=(1, 2))]
    if self.max_pool:
      pooled.append(x.max(axis=(1, 2)))
    pooled = jnp.concatenate(pooled, -1).astype(jnp.float32)  # [N, D]
    logits = {name: nn.Dense(n, dtype=jnp.float32, name=f"head_{name}")(pooled)
              for name, n in self.heads}
    # The feature space of the fidelity and privacy metrics: what the heads read, and the
    # first stage's texture statistics, so a blurred or blotchy image moves away from real.
    return logits, jnp.concatenate([pooled, texture.astype(jnp.float32)], -1)


CONTRAST_SIGMA = 1 / 60  # Gaussian width of the local background, as a fraction of image side
CONTRAST_GAIN = 4.0  # scales image - background so lesion contrast spans about [-1, 1]


def gaussian_band(n: int, sigma: float) -> np.ndarray:
  """[n, n] matrix of a 1-D Gaussian blur (taps to 3 sigma, normalised) with zero padding:
  `band @ x` blurs x along its first axis exactly as a "SAME" convolution with those taps."""
  radius = int(np.ceil(3 * sigma))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps = taps / taps.sum()
  offset = np.arange(n)[None, :] - np.arange(n)[:, None] + radius  # tap index of (row, column)
  inside = (offset >= 0) & (offset < len(taps))
  return np.where(inside, taps[np.clip(offset, 0, len(taps) - 1)], 0.0)


def local_contrast(images: jax.Array) -> jax.Array:
  """CONTRAST_GAIN * (image - Gaussian-blurred image): small dots and spots stand out.

  The fixed high-pass of Graham's Kaggle DR preprocessing: microaneurysms, haemorrhages,
  exudates and drusen are a few pixels across and differ from the local background by a few
  grey levels, far less than the background varies across the field, so a network sees them
  sooner in the difference. The separable Gaussian blur runs as two matrix products with
  banded matrices (`gaussian_band`), the same sums as a per-channel convolution: XLA:CPU runs
  that grouped convolution ~30x slower (55 ms against 1.9 ms for 32 images of 64 px, 517
  against 26 ms for 64 of 128 px), most of the step of the TSTR and C2ST classifiers.
  """
  _, h, w, _ = images.shape
  sigma = max(CONTRAST_SIGMA * h, 0.5)
  rows = jnp.asarray(gaussian_band(h, sigma), images.dtype)
  cols = jnp.asarray(gaussian_band(w, sigma), images.dtype)
  blurred = jnp.einsum("hk,nkwc->nhwc", rows, images)
  blurred = jnp.einsum("wk,nhkc->nhwc", cols, blurred)
  return CONTRAST_GAIN * (images - blurred)


def make_model(model_config: Mapping[str, Any]) -> FundusEvaluator:
  """The module from a JSON-able model config {"width", "stage_sizes", "heads", "contrast",
  "max_pool", optional "stem_stride" (default 1)}."""
  return FundusEvaluator(width=int(model_config["width"]),
                         stage_sizes=tuple(model_config["stage_sizes"]),
                         heads=tuple(dict(model_config.get("heads") or HEADS).items()),
                         contrast=bool(model_config["contrast"]),
                         max_pool=bool(model_config["max_pool"]),
                         stem_stride=int(model_config.get("stem_stride", 1)))


def init_params(model: FundusEvaluator, rng: jax.Array, resolution: int) -> Any:
  """Fresh params for square NHWC inputs of the given resolution."""
  return _jitted_init(model, resolution)(rng)


@functools.lru_cache(maxsize=8)
def _jitted_init(model: FundusEvaluator, resolution: int):
  init = lambda key: model.init(key, jnp.zeros((1, resolution, resolution, 3)))["params"]
  return parallel.jit_once(init)


@functools.partial(jax.jit, static_argnums=0)
def apply(model: FundusEvaluator, params, images):
  """Jitted forward pass: ({head: logits [N, K]}, features [N, D])."""
  return model.apply({"params": params}, jnp.asarray(images, jnp.float32))


def _batched(model, params, images, batch_size: int):
  """Runs `apply` over fixed-size batches (the last one padded) so it compiles once."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 127.5 - 1.0
  n = len(images)
  outs = []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    logits, feats = apply(model, params, chunk)
    outs.append(jax.device_get((logits, feats)))
  logits = {k: np.concatenate([o[0][k] for o in outs])[:n] for k in outs[0][0]}
  return logits, np.concatenate([o[1] for o in outs])[:n]


def features(model: FundusEvaluator, params, images, *, batch_size: int = 64) -> np.ndarray:
  """Penultimate-layer features [N, D] of NHWC images (float [-1, 1] or uint8)."""
  return _batched(model, params, images, batch_size)[1]


def decode(logits: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Head logits -> per-attribute predictions: class indices, or the CDR clipped to [0, 1];
  with a CDR head also "glaucoma" (0/1: CDR >= GLAUCOMA_CDR)."""
  out = {}
  for name, value in logits.items():
    value = np.asarray(value)
    out[name] = (np.clip(value[:, 0], 0.0, 1.0) if name in REGRESSION_HEADS
                 else value.argmax(-1))
  if "cdr" in out:
    out["glaucoma"] = (out["cdr"] >= GLAUCOMA_CDR).astype(int)
  return out


def predict(model: FundusEvaluator, params, images, *, batch_size: int = 64) -> dict:
  """Per-attribute predictions for NHWC images: {head: [N] class index, or CDR float}.

  Class indices follow `consistency.label_code` (laterality 0 right / 1 left, field 0 macula /
  1 disc, quality 0 good / 1 usable / 2 reject, grades as integers, dme and glaucoma 0/1).
  """
  return decode(_batched(model, params, images, batch_size)[0])


def predict_proba(model: FundusEvaluator, params, images, *, batch_size: int = 64) -> dict:
  """Softmax probabilities {head: [N, K]} of the categorical heads."""
  logits, _ = _batched(model, params, images, batch_size)
  return {k: np.asarray(jax.nn.softmax(v, -1)) for k, v in logits.items()
          if k not in REGRESSION_HEADS}


def targets_from_labels(labels: Sequence[labels_lib.FundusLabels],
                        heads: Sequence[str] = tuple(HEADS)) -> dict[str, np.ndarray]:
  """Training targets {head: [N]} (int32 codes, float32 CDR) from label records (all known)."""
  out = {}
  for name in heads:
    codes = [consistency.label_code(name, l) for l in labels]
    if any(c is None for c in codes):
      raise ValueError(f"labels without a {name!r} cannot train the {name!r} head")
    out[name] = np.asarray(codes, np.float32 if name in REGRESSION_HEADS else np.int32)
  return out


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """A loaded evaluator: the module and its params, with the metric-facing calls bound.

  Attributes:
    model: the module.
    params: its params.
    resolution: the side it reads images at.
    heldout: its held-out phantom scores (heldout.json; {} when unknown).
  """
  model: FundusEvaluator
  params: Any
  resolution: int
  heldout: Mapping[str, float] = dataclasses.field(default_factory=dict)

  @property
  def readable(self) -> tuple[str, ...] | None:
    """Attributes read well enough to score (`readable_attributes`); None when not known."""
    return readable_attributes(self.heldout) if self.heldout else None

  def features(self, images) -> np.ndarray:
    """Penultimate-layer features [N, D] (images resized to the evaluator's resolution)."""
    return features(self.model, self.params, self.prepare(images))

  def predict(self, images) -> dict:
    """Per-attribute predictions {head: [N]} (see the module-level `predict`)."""
    return predict(self.model, self.params, self.prepare(images))

  def prepare(self, images) -> np.ndarray:
    """NHWC images at the evaluator's resolution, float32 in [-1, 1] (see `resize`)."""
    return resize(images, self.resolution)


def resize(images, resolution: int) -> np.ndarray:
  """NHWC images (uint8 or float in [-1, 1]) as float32 [-1, 1] at `resolution` x `resolution`.

  Antialiased bilinear, so shrinking averages rather than aliases; a no-op at that size.
  """
  images = np.asarray(images)
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 127.5 - 1.0
  if images.shape[1:3] != (resolution, resolution):
    images = np.asarray(jax.image.resize(
        images, (len(images), resolution, resolution, images.shape[-1]), "linear",
        antialias=True))
  return images.astype(np.float32)


MODEL_KEYS = ("width", "stage_sizes", "heads", "contrast", "max_pool", "resolution")


def save_evaluator(directory: str | os.PathLike, params, model_config: Mapping[str, Any],
                   extra: Mapping[str, Any] | None = None) -> None:
  """Writes params and config.json through `params_io.save_params` (kind "evaluator").

  Args:
    directory: target directory (created; an existing params checkpoint is replaced).
    params: the evaluator params.
    model_config: JSON-able {"width", "stage_sizes", "heads", "resolution"}.
    extra: more JSON-able entries for config.json (training config, held-out metrics).

  Raises:
    ValueError: the model config lacks a field or is not JSON-serialisable.
  """
  missing = [k for k in MODEL_KEYS if k not in model_config]
  if missing:
    raise ValueError(f"evaluator model config lacks {missing}; needs {MODEL_KEYS}")
  params_io.save_params(directory, jax.device_get(params), dict(model_config), KIND,
                        extra=dict(extra or {}), overwrite=True)


def load_evaluator(directory: str | os.PathLike) -> Evaluator:
  """Loads an evaluator directory written by `save_evaluator` (or the evaluator trainer).

  The module is rebuilt from config.json alone and the stored params are checked against it,
  so a directory is self-describing and a damaged one fails here, not inside a metric.

  Raises:
    FileNotFoundError: naming the missing directory or file.
    ValueError: naming the file: unreadable config.json or params, another kind of params, a
      config without a model field, or params that do not fit the model the config describes.
  """
  directory = os.path.abspath(os.fspath(directory))
  config_path = os.path.join(directory, params_io.CONFIG_FILE)
  try:
    meta = params_io.load_meta(directory, expected_kind=KIND)
  except json.JSONDecodeError as e:
    raise ValueError(f"evaluator config {config_path} is not valid JSON: {e}") from e
  config = meta["config"]
  missing = [k for k in MODEL_KEYS if k not in config]
  if missing:
    raise ValueError(f"evaluator config {config_path} lacks {missing}; needs {MODEL_KEYS}")
  model = make_model(config)
  resolution = int(config["resolution"])
  params_path = os.path.join(directory, params_io.PARAMS_DIR)
  try:
    params, _ = params_io.load_params(directory, expected_kind=KIND)
  except FileNotFoundError:
    raise
  except Exception as e:  # Orbax raises assorted types for truncated or garbled files
    raise ValueError(f"cannot read the evaluator params in {params_path} (damaged or "
                     f"incomplete checkpoint): {type(e).__name__}: {e}") from e
  expected = jax.eval_shape(
      lambda key: model.init(key, jnp.zeros((1, resolution, resolution, 3)))["params"],
      jax.random.key(0))
  params_io.check_params_match(expected, params, what=f"evaluator params in {params_path}")
  return Evaluator(model, jax.tree.map(jnp.asarray, params), resolution,
                   dict(meta.get("heldout") or {}))
