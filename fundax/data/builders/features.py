"""The feature schema shared by every fundax TFDS dataset, and the helpers that fill and read it.

Every builder (the phantom and each real dataset) writes the same core features, so the input
pipeline, the stats code and the CLI read any dataset the same way:

  image       encoded RGB image (PNG for the phantom; the original JPEG/PNG bytes for real data)
  id          stable example id (a file name for real data, seed-derived for the phantom)
  caption     `captions.caption(labels, 0)`: the text the model is conditioned on
  labels      `FundusLabels.to_json()`; unknown fields are null
  synthetic   True for the phantom
  dr_grade    ICDR grade 0-4      \
  quality     0 good, 1 usable, 2 reject   > int32 copies of the labels for filtering and stats;
  laterality  0 right, 1 left     /   -1 means unknown

The phantom adds "record" (its full JSON scene record) and, when asked, "masks": one
single-channel PNG per name in `phantom.MASK_NAMES` (0 or 255).

Images are handed to TFDS as encoded bytes, never as numpy arrays: TFDS encodes arrays with
TensorFlow, which fundax does not depend on.
"""

from __future__ import annotations

import io
import json
from typing import Any, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from fundax.data import captions
from fundax.data import labels as labels_lib

UNKNOWN = -1
QUALITY_CODES = {name: i for i, name in enumerate(labels_lib.QUALITIES)}  # good 0 ... reject 2
LATERALITY_CODES = {name: i for i, name in enumerate(labels_lib.LATERALITIES)}  # right 0, left 1
SCALAR_NAMES = ("dr_grade", "quality", "laterality")


def make_features(
    image_shape: tuple[int | None, int | None, int] = (None, None, 3),
    *,
    encoding_format: str | None = None,
    with_record: bool = False,
    mask_names: Sequence[str] = (),
) -> tfds.features.FeaturesDict:
  """The common feature schema, plus the phantom-only extras when asked.

  Args:
    image_shape: [H, W, 3]; fixed for the phantom, (None, None, 3) for real photographs.
    encoding_format: "png", "jpeg" or None (store the bytes given, whatever their format).
    with_record: add the "record" Text feature (the phantom's JSON scene record).
    mask_names: names of the single-channel masks to store under "masks" (empty: no masks).

  Returns:
    The `tfds.features.FeaturesDict` every fundax builder declares in its `_info`.
  """
  spec = {
      "image": tfds.features.Image(shape=image_shape, encoding_format=encoding_format),
      "id": tfds.features.Text(),
      "caption": tfds.features.Text(),
      "labels": tfds.features.Text(),
      "synthetic": tfds.features.Scalar(np.bool_),
  }
  for name in SCALAR_NAMES:
    spec[name] = tfds.features.Scalar(np.int32)
  if with_record:
    spec["record"] = tfds.features.Text()
  if mask_names:
    mask_shape = (image_shape[0], image_shape[1], 1)
    spec["masks"] = tfds.features.FeaturesDict({
        name: tfds.features.Image(shape=mask_shape, encoding_format="png")
        for name in mask_names
    })
  return tfds.features.FeaturesDict(spec)


def encode_png(array: np.ndarray) -> bytes:
  """PNG bytes of a uint8 [H, W, 3] image or a [H, W] mask (bool masks become 0/255).

  Args:
    array: uint8 RGB image [H, W, 3], uint8 greyscale [H, W] or bool mask [H, W].

  Returns:
    The encoded PNG.
  """
  array = np.asarray(array)
  if array.dtype == np.bool_:
    array = array.astype(np.uint8) * 255
  if array.dtype != np.uint8:
    raise ValueError(f"expected a uint8 or bool array, got {array.dtype}")
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def label_codes(labels: labels_lib.FundusLabels) -> dict[str, np.int32]:
  """The int32 scalar features ("dr_grade", "quality", "laterality") of `labels`; -1 = unknown."""
  return {
      "dr_grade": np.int32(UNKNOWN if labels.dr_grade is None else labels.dr_grade),
      "quality": np.int32(QUALITY_CODES.get(labels.quality, UNKNOWN)),
      "laterality": np.int32(LATERALITY_CODES.get(labels.laterality, UNKNOWN)),
  }


def make_example(
    example_id: str,
    image: bytes | str,
    labels: labels_lib.FundusLabels,
    *,
    synthetic: bool,
) -> dict[str, Any]:
  """The common features of one example, ready to yield from `_generate_examples`.

  Args:
    example_id: stable id of the example.
    image: encoded image bytes (PNG/JPEG) or a path to an image file.
    labels: what is known about the image; also the source of the caption.
    synthetic: True for generated (phantom) images.

  Returns:
    A dict with every common feature filled in; builders add their own extras to it.
  """
  return {
      "image": image,
      "id": example_id,
      "caption": captions.caption(labels, 0),
      "labels": labels.to_json(),
      "synthetic": synthetic,
      **label_codes(labels),
  }


def _text(value: str | bytes) -> str:
  # Text features come back as bytes or str depending on the TFDS reader.
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_example(ex: dict[str, Any]) -> dict[str, Any]:
  """Turns one example read from a data source into Python/numpy values for the pipeline.

  Args:
    ex: an example from `builder.as_data_source(split)[i]` of any fundax dataset.

  Returns:
    A dict with "image" (uint8 [H, W, 3]), "labels" (`FundusLabels`), "caption" (str),
    "id" (str) and "synthetic" (bool); phantom examples also carry "record" (dict) and, when
    the dataset stores them, "masks" (name -> bool [H, W]).
  """
  image = np.asarray(ex["image"], dtype=np.uint8)
  if image.ndim == 2:  # a greyscale file stored by an external tool; the model wants RGB
    image = np.repeat(image[..., None], 3, axis=-1)
  out = {
      "image": image,
      "labels": labels_lib.FundusLabels.from_json(_text(ex["labels"])),
      "caption": _text(ex["caption"]),
      "id": _text(ex["id"]),
      "synthetic": bool(ex["synthetic"]),
  }
  if "record" in ex:
    out["record"] = json.loads(_text(ex["record"]))
  if "masks" in ex:
    out["masks"] = {name: np.asarray(m)[..., 0] > 0 for name, m in ex["masks"].items()}
  return out
