"""The training/eval input pipeline: records -> preprocessed, tokenised, globally sharded batches.

Reads any random-access data source of fundax records (a TFDS `as_data_source()`, or a plain
list of dicts in tests) with grain, and owns everything between a stored record and the batch a
step consumes:
  * per-example preprocessing (pure numpy, `preprocess_example`): field-of-view crop, resize,
    [-1, 1] NHWC float32, laterality-aware horizontal flip, caption choice;
  * deterministic order: a seeded shuffle that differs per epoch, and per-example randomness
    from `np.random.default_rng([seed, process_index, position])`, so a run is reproducible and
    a restored iterator replays exactly the batches that were still to come;
  * multi-host: each process reads a disjoint contiguous shard of the records and builds its
    `global_batch_size / process_count` rows; `parallel.host_local_to_global` assembles them
    into global `jax.Array`s sharded over the mesh's batch axes.

A horizontal flip mirrors the eye, so it turns a right eye into a left one: the labels are
replaced by `labels.flipped()` and the caption is always regenerated from those labels; a stored
caption is only used when flips are off.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image

from fundax import parallel
from fundax.data import captions
from fundax.data import labels as labels_lib
from fundax.data import tokenizer as tokenizer_lib

# Batch fields that stay host-local numpy (strings cannot be jax arrays); the rest go global.
HOST_FIELDS = ("caption", "id", "labels")


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _box_blur(x: np.ndarray, radius: int) -> np.ndarray:
  """Separable mean filter of half-width `radius` (edges use the available pixels)."""
  for axis in (0, 1):
    padded = np.cumsum(np.pad(x, [(radius + 1, radius) if a == axis else (0, 0)
                                  for a in range(2)], mode="edge"), axis=axis)
    x = (np.take(padded, np.arange(2 * radius + 1, padded.shape[axis]), axis=axis)
         - np.take(padded, np.arange(0, padded.shape[axis] - 2 * radius - 1), axis=axis))
    x = x / (2 * radius + 1)
  return x


def fov_bbox(image: np.ndarray, *, threshold_fraction: float = 0.1,
             min_threshold: float = 10.0) -> tuple[int, int, int, int]:
  """Bounding box of the camera's circular field of view in a fundus photograph.

  The FOV is where the blurred brightness exceeds `threshold_fraction` of a bright level (the
  99th percentile) and `min_threshold`; blurring ignores dark vessels and noise. Rows or
  columns with only a few bright pixels are ignored, and of the bright rows (columns) only the
  longest contiguous run counts, so text burnt into the black border is left out.

  Args:
    image: uint8 [H, W, 3].
    threshold_fraction: fraction of the bright level that counts as inside the FOV.
    min_threshold: absolute floor of the threshold, in 0-255 units.

  Returns:
    (top, left, bottom, right), exclusive bottom/right; the whole image when nothing is found.
  """
  h, w = image.shape[:2]
  stride = max(1, min(h, w) // 256)  # the box only needs ~256 px precision: work small
  brightness = image[::stride, ::stride].astype(np.float32).mean(axis=-1)
  blurred = _box_blur(brightness, max(1, min(brightness.shape) // 64))
  threshold = max(min_threshold, threshold_fraction * float(np.percentile(blurred, 99)))
  mask = blurred > threshold
  if not mask.any():
    return 0, 0, h, w
  top, bottom = _longest_run(mask.sum(axis=1) >= 0.05 * mask.sum(axis=1).max())
  left, right = _longest_run(mask.sum(axis=0) >= 0.05 * mask.sum(axis=0).max())
  return (top * stride, left * stride, min(h, bottom * stride), min(w, right * stride))


def _longest_run(active: np.ndarray) -> tuple[int, int]:
  """[start, stop) of the longest run of True: the FOV, not a text label beside it."""
  edges = np.diff(np.concatenate([[0], active.astype(np.int8), [0]]))
  starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
  best = int(np.argmax(stops - starts))
  return int(starts[best]), int(stops[best])


def crop_to_fov(image: np.ndarray) -> np.ndarray:
  """Crops a square centred on the field of view, padding with black where it leaves the image.

  Args:
    image: uint8 [H, W, 3] photograph (black border, possibly off-centre or clipped circle).

  Returns:
    uint8 [S, S, 3] with S the larger side of the FOV's bounding box.
  """
  h, w = image.shape[:2]
  top, left, bottom, right = fov_bbox(image)
  side = max(bottom - top, right - left)
  y0, x0 = (top + bottom - side) // 2, (left + right - side) // 2
  out = np.zeros((side, side) + image.shape[2:], image.dtype)
  sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y0 + side, h), min(x0 + side, w)
  out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
  return out


def resize(image: np.ndarray, resolution: int) -> np.ndarray:
  """Antialiased (PIL bicubic, support scaled when shrinking) resize of uint8 [H, W, 3]."""
  if image.shape[:2] == (resolution, resolution):
    return image
  pil = Image.fromarray(image).resize((resolution, resolution), Image.Resampling.BICUBIC)
  return np.asarray(pil)


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return image.astype(np.float32) / 127.5 - 1.0


def _label_codes(labels: labels_lib.FundusLabels) -> dict[str, np.int32]:
  """int32 "dr_grade"/"quality"/"laterality" codes (-1 unknown), as the builders store them.

  Recomputed from the labels rather than read from the record, so that they follow a flip.
  """
  def code(value, choices):
    return np.int32(-1 if value is None else choices.index(value))
  return {
      "dr_grade": np.int32(-1 if labels.dr_grade is None else labels.dr_grade),
      "quality": code(labels.quality, labels_lib.QUALITIES),
      "laterality": code(labels.laterality, labels_lib.LATERALITIES),
  }


def preprocess_example(example: dict[str, Any], rng: np.random.Generator, *, resolution: int,
                       flip: bool = True, random_caption_style: bool = True,
                       crop_fov: bool = True, valid: bool = True,
                       canonical_eye: str = "") -> dict[str, Any]:
  """Turns one stored record into a model-ready example (no tokenisation; that is per batch).

  Args:
    example: a record: "image" uint8 [H, W, 3], "labels" FundusLabels JSON, "caption", "id",
      optionally "synthetic"; the int label fields are recomputed from "labels".
    rng: this example's generator (flip and caption style).
    resolution: output side, px.
    flip: mirror horizontally with probability 1/2, with labels flipped and caption regenerated.
    random_caption_style: caption = `captions.caption(labels, random style)`; otherwise style 0
      when flips are on, and the stored caption when they are off.
    crop_fov: crop to the field of view first (real photographs); off for pre-cropped images.
    valid: False for padding examples of an eval batch (carried as the "valid" field).
    canonical_eye: "" or "right": an eye of the other side is mirrored into this one's
      orientation with its labels and caption unchanged (they still name its own eye), and
      random flips apply only to images of unknown laterality. A generator trained so draws
      one orientation and mirrors left-eye samples (`sampling.eye_mirror`).

  Returns:
    dict: "image" float32 [R, R, 3] in [-1, 1]; "caption", "id", "labels" (JSON, after the
    flip) str; "dr_grade", "quality", "laterality" int32 (-1 unknown; laterality 0 right,
    1 left, after the flip); "synthetic", "flipped", "valid" bool.
  """
  image = np.asarray(example["image"])
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if crop_fov:
    image = crop_to_fov(image)
  image = resize(image, resolution)
  labels = labels_lib.FundusLabels.from_json(example["labels"])
  # Draw both numbers unconditionally so that turning one option off leaves the other's draws
  # (and so the rest of a run) unchanged.
  flipped = bool(rng.random() < 0.5) and flip
  style = int(rng.integers(captions.NUM_STYLES))
  canonical = canonical_eye and labels.laterality is not None
  if canonical:
    flipped = labels.laterality != canonical_eye
    if flipped:
      image = image[:, ::-1]  # the labels keep their own eye
  elif flipped:
    image = image[:, ::-1]
    labels = labels.flipped()
  if random_caption_style:
    text = captions.caption(labels, style)
  elif flip:
    text = captions.caption(labels, 0)
  else:
    text = _text(example["caption"])
  return {
      "image": to_float(image),
      "caption": text,
      "id": _text(example.get("id", b"")),
      "labels": labels.to_json(),
      **_label_codes(labels),
      "synthetic": np.bool_(example.get("synthetic", False)),
      "flipped": np.bool_(flipped),
      "valid": np.bool_(valid),
  }


def process_shard(num_records: int, process_index: int, process_count: int, *,
                  even: bool = True) -> range:
  """The contiguous record indices one process reads.

  Args:
    num_records: records in the source.
    process_index: this process, in [0, process_count).
    process_count: number of processes.
    even: every shard gets `num_records // process_count` records (the last remainder records
      are dropped), so all processes yield the same number of batches; else sizes differ by at
      most one and the shards cover every record.

  Returns:
    A range of source indices; shards of different processes are disjoint.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if even:
    size = num_records // process_count
    return range(process_index * size, (process_index + 1) * size)
  return range(process_index * num_records // process_count,
               (process_index + 1) * num_records // process_count)


class GlobalBatchIterator:
  """Iterates batches as global `jax.Array`s (host fields stay numpy); checkpointable.

  `get_state()` returns a JSON-able dict; `set_state()` on an iterator built by `make_pipeline`
  with the same arguments continues with exactly the batches that would have followed.
  """

  def __init__(self, iterator: grain.DatasetIterator, mesh: jax.sharding.Mesh | None):
    self._iterator = iterator
    self._mesh = mesh

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    batch = next(self._iterator)
    if self._mesh is None:
      return batch
    host = {k: v for k, v in batch.items() if k in HOST_FIELDS}
    device = {k: v for k, v in batch.items() if k not in HOST_FIELDS}
    return {**parallel.host_local_to_global(device, self._mesh), **host}

  def get_state(self) -> dict[str, Any]:
    return self._iterator.get_state()

  def set_state(self, state: dict[str, Any]):
    self._iterator.set_state(state)


def make_pipeline(source: Sequence[dict[str, Any]], *, global_batch_size: int, resolution: int,
                  max_length: int, tokenizer: tokenizer_lib.Tokenizer, seed: int,
                  flip: bool = True, random_caption_style: bool = True, crop_fov: bool = True,
                  canonical_eye: str = "", shuffle: bool = True, num_epochs: int | None = None,
                  mesh: jax.sharding.Mesh | None = None, drop_remainder: bool = True,
                  process_index: int | None = None, process_count: int | None = None,
                  num_threads: int = 2, prefetch: int = 4) -> GlobalBatchIterator:
  """Builds the batch iterator over a data source.

  Args:
    source: random-access records (len and __getitem__), e.g. `datasets.load(...)`.
    global_batch_size: examples per step over all processes.
    resolution: image side, px.
    max_length: token sequence length L.
    tokenizer: from `tokenizer.make_tokenizer`.
    seed: shuffle and augmentation seed.
    flip: random laterality-aware horizontal flips (see `preprocess_example`).
    random_caption_style: captions from the labels in a random style (see `preprocess_example`).
    canonical_eye: every eye in this one's orientation (see `preprocess_example`).
    crop_fov: crop each photograph to its field of view.
    shuffle: shuffle the records, differently each epoch.
    num_epochs: passes over the data; None repeats forever (training).
    mesh: when given, batches are global `jax.Array`s sharded over its batch axes; when None,
      host-local numpy batches.
    drop_remainder: True (training): every shard is cut to the same size and the last partial
      batch dropped. False (eval): each epoch is padded up to whole batches, identically on
      every process, with examples whose "valid" field is False.
    process_index, process_count: this process and how many read the data; default jax's.
    num_threads: grain reader threads.
    prefetch: batches grain prepares ahead.

  Returns:
    A `GlobalBatchIterator` yielding dicts: "image" float32 [B, R, R, 3], "input_ids" and
    "attention_mask" int32 [B, L], "dr_grade"/"quality"/"laterality" int32 [B], "synthetic"/
    "flipped"/"valid" bool [B] (B global when a mesh is given), plus host-local numpy
    "caption"/"id"/"labels" str [B_local].

  Raises:
    ValueError: on a batch size that the processes or the mesh cannot split, or too few
      records; raised before any data is read.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                     f"the process count {process_count}")
  if mesh is not None and global_batch_size % parallel.batch_size_divisor(mesh):
    raise ValueError(f"global_batch_size {global_batch_size} must be a multiple of the mesh's "
                     f"batch axes {parallel.batch_axes(mesh)} = "
                     f"{parallel.batch_size_divisor(mesh)} devices")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
  if resolution < 1 or max_length < 2:
    raise ValueError(f"need resolution >= 1 and max_length >= 2, got {resolution}, {max_length}")
  local_batch_size = global_batch_size // process_count
  shard = process_shard(len(source), process_index, process_count, even=drop_remainder)
  if not shard or (drop_remainder and num_epochs is not None
                   and len(shard) * num_epochs < local_batch_size):
    raise ValueError(f"{len(source)} records over {process_count} processes give process "
                     f"{process_index} {len(shard)} records: too few for a batch of "
                     f"{local_batch_size}")
  if drop_remainder:
    epoch_length = len(shard)
  else:
    largest = math.ceil(len(source) / process_count)
    epoch_length = math.ceil(largest / local_batch_size) * local_batch_size
  if flip and not random_caption_style:
    logging.info("flips are on: captions are regenerated from the labels (style 0), "
                 "not read from the records")

  def load(position: int, local_index: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, process_index, position])
    valid = local_index < len(shard)
    record = source[shard[local_index if valid else 0]]
    return preprocess_example(record, rng, resolution=resolution, flip=flip,
                              random_caption_style=random_caption_style, crop_fov=crop_fov,
                              valid=valid, canonical_eye=canonical_eye)

  def add_tokens(batch: dict[str, Any]) -> dict[str, Any]:
    return {**batch, **tokenizer_lib.tokenize(tokenizer, list(batch["caption"]), max_length)}

  ds = grain.MapDataset.range(epoch_length)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.map_with_index(load)
  ds = ds.batch(local_batch_size, drop_remainder=drop_remainder)
  ds = ds.map(add_tokens)
  read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return GlobalBatchIterator(iter(ds.to_iter_dataset(read_options)), mesh)
