"""Build, load and summarise fundax's TFDS datasets by name: the functions the CLI calls.

Names: "fundus_phantom" (generated, no download) and the real datasets "eyepacs", "aptos2019",
"idrid", "eyeq", "odir5k", "messidor2", which are read from the user's own download
(`manual_dir`; see each builder's MANUAL_DOWNLOAD_INSTRUCTIONS) and never downloaded.
Datasets are written as array_record and read back with `as_data_source()`, without TensorFlow.
"""

from __future__ import annotations

import collections
import logging
import pathlib
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from fundax.data import labels as labels_lib
from fundax.data.builders import dr_grading
from fundax.data.builders import fundus_phantom
from fundax.data.builders import manual
from fundax.data.builders import odir5k

BUILDERS = {
    "fundus_phantom": fundus_phantom.FundusPhantom,
    "eyepacs": dr_grading.Eyepacs,
    "aptos2019": dr_grading.Aptos2019,
    "idrid": dr_grading.Idrid,
    "eyeq": dr_grading.Eyeq,
    "odir5k": odir5k.Odir5k,
    "messidor2": dr_grading.Messidor2,
}
_PHANTOM_SIZE_KEYS = ("resolution", "num_train", "num_val", "num_test", "with_masks")


def get_builder(name: str, data_dir: str | None = None, config: str | None = None,
                **kw) -> tfds.core.DatasetBuilder:
  """The (not necessarily prepared) builder of dataset `name`.

  Args:
    name: one of `BUILDERS`.
    data_dir: TFDS data directory; None or "" for the TFDS default.
    config: builder config name; None for the default. For the phantom, sizes may be given
      instead as keywords (`resolution`, `num_train`, `num_val`, `num_test`, `with_masks`),
      which pick the config (`fundus_phantom.find_config`).
    **kw: the phantom's sizes and `num_workers`; real datasets' `skip_bad` and
      `validation_fraction` (see `manual.ManualBuilder`).

  Returns:
    The builder.
  """
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(BUILDERS)}")
  data_dir = data_dir or None
  if name == "fundus_phantom":
    sizes = {k: kw.pop(k) for k in _PHANTOM_SIZE_KEYS if k in kw}
    if sizes:
      if config is not None:
        raise ValueError(f"give either config={config!r} or phantom sizes {sorted(sizes)}")
      config = fundus_phantom.find_config(**sizes)
  return BUILDERS[name](data_dir=data_dir, config=config, **kw)


def build(name: str, data_dir: str | None, manual_dir: str | None = None,
          config: str | None = None, **kw) -> tfds.core.DatasetBuilder:
  """Prepares dataset `name` under `data_dir` (a no-op when it is already there).

  Args:
    name: one of `BUILDERS`.
    data_dir: TFDS data directory; None or "" for the TFDS default.
    manual_dir: the user's download of a real dataset; None: `<data_dir>/downloads/manual`.
      Ignored by the phantom.
    config: builder config name (see `get_builder`).
    **kw: phantom sizes or real-dataset options (see `get_builder`).

  Returns:
    The prepared builder.

  Raises:
    FileNotFoundError: naming the missing manual_dir or annotation file.
  """
  builder = get_builder(name, data_dir, config, **kw)
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
  builder.download_and_prepare(download_config=download_config)
  logging.info("%s prepared in %s", name, builder.data_dir)
  return builder


def load(name: str, split: str, data_dir: str | None, config: str | None = None, **kw):
  """The random-access array_record data source of one split of a prepared dataset.

  Args:
    name: one of `BUILDERS`.
    split: "train", "validation", "test" (or any TFDS split expression, e.g. "train[:10]").
    data_dir: TFDS data directory the dataset was built in.
    config: builder config name (see `get_builder`); phantom sizes may be given as **kw.
    **kw: phantom sizes (see `get_builder`).

  Returns:
    The data source (`len`, `__getitem__`); `builders.features.decode_example` turns its
    examples into numpy/`FundusLabels` values.
  """
  builder = _prepared(name, data_dir, config, **kw)
  return builder.as_data_source(split=split)


def stats(name: str, data_dir: str | None, config: str | None = None, **kw) -> dict[str, Any]:
  """Counts and label distributions of a prepared dataset, per split and in total.

  Args:
    name: one of `BUILDERS`.
    data_dir: TFDS data directory the dataset was built in.
    config: builder config name (see `get_builder`); phantom sizes may be given as **kw.
    **kw: phantom sizes (see `get_builder`).

  Returns:
    {"dataset", "config", "data_dir", "splits": {split: counts}, "total": counts,
    "build_summary": the written/skipped summary of a real dataset (None for the phantom)},
    where counts are {"num_examples", "dr_grade", "quality", "laterality", "synthetic"}, each
    distribution a dict from value name ("unknown" for -1) to count.
  """
  builder = _prepared(name, data_dir, config, **kw)
  # Images are never decoded: only the scalar features are counted.
  decoders = {"image": tfds.decode.SkipDecoding()}
  if "masks" in builder.info.features:
    decoders["masks"] = {m: tfds.decode.SkipDecoding() for m in builder.info.features["masks"]}
  splits, total = {}, _Counts()
  for split in sorted(builder.info.splits):
    counts = _Counts()
    for ex in builder.as_data_source(split=split, decoders=decoders):
      counts.add(ex)
      total.add(ex)
    splits[split] = counts.as_dict()
  return {
      "dataset": name,
      "config": builder.builder_config.name if builder.builder_config else None,
      "data_dir": str(builder.data_dir),
      "splits": splits,
      "total": total.as_dict(),
      "build_summary": manual.read_summary(builder.data_dir),
  }


class _Counts:
  """Histograms of the scalar label features over examples."""

  _NAMES = {
      "dr_grade": {g: str(g) for g in range(5)},
      "quality": dict(enumerate(labels_lib.QUALITIES)),
      "laterality": dict(enumerate(labels_lib.LATERALITIES)),
  }

  def __init__(self):
    self.num_examples = 0
    self.hist = {k: collections.Counter() for k in (*self._NAMES, "synthetic")}

  def add(self, ex: dict[str, Any]):
    self.num_examples += 1
    for key, names in self._NAMES.items():
      self.hist[key][names.get(int(ex[key]), "unknown")] += 1
    self.hist["synthetic"][str(bool(ex["synthetic"])).lower()] += 1

  def as_dict(self) -> dict[str, Any]:
    return {"num_examples": self.num_examples,
            **{k: dict(sorted(v.items())) for k, v in self.hist.items()}}


def _prepared(name, data_dir, config, **kw) -> tfds.core.DatasetBuilder:
  builder = get_builder(name, data_dir, config, **kw)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"dataset {name} ({builder.builder_config.name if builder.builder_config else 'default'})"
        f" is not built in {builder.data_dir}; build it first (`fundax data build`)")
  return builder


def _config_kwargs(data_config) -> tuple[str, dict[str, Any]]:
  """(name, keyword arguments for get_builder) from a job config's `data` section."""
  if data_config.name == "fundus_phantom":
    return data_config.name, dict(
        resolution=data_config.resolution, num_train=data_config.num_train,
        num_val=data_config.num_validation, num_test=data_config.num_test,
        with_masks=data_config.with_masks)
  return data_config.name, {}


def build_from_config(data_config) -> dict[str, Any]:
  """Builds the dataset a job config's `data` section (`fundax.data.config`) describes.

  Args:
    data_config: the `data` ConfigDict (name, data_dir, manual_dir, sizes, skip_bad).

  Returns:
    {"dataset", "data_dir", "splits": examples per split, "build_summary"} for printing.
  """
  name, kw = _config_kwargs(data_config)
  if name != "fundus_phantom":
    kw["skip_bad"] = data_config.skip_bad
  builder = build(name, data_config.data_dir, data_config.manual_dir or None, **kw)
  return {
      "dataset": name,
      "data_dir": str(builder.data_dir),
      "splits": {s: info.num_examples for s, info in builder.info.splits.items()},
      "build_summary": manual.read_summary(builder.data_dir),
  }


def load_from_config(data_config, split: str):
  """`load` for the dataset a job config's `data` section describes."""
  name, kw = _config_kwargs(data_config)
  return load(name, split, data_config.data_dir, **kw)


def read_split(data_config, split: str, num: int, *, resolution: int):
  """The first `num` examples of a split of a job config's dataset, decoded: (images float
  [N, R, R, 3] in [-1, 1] at `resolution`, their labels). What the main job's evaluation and
  the benchmarks read their reference and held-out images with."""
  from fundax.data import pipeline  # pylint: disable=g-import-not-at-top
  from fundax.data.builders import features  # pylint: disable=g-import-not-at-top
  source = load_from_config(data_config, split)
  examples = [features.decode_example(source[i]) for i in range(min(num, len(source)))]
  if not examples:
    raise ValueError(f"the {split} split of {data_config.name} is empty")
  images = np.stack([pipeline.to_float(pipeline.resize(e["image"], resolution))
                     for e in examples])
  return images, [e["labels"] for e in examples]


def stats_from_config(data_config) -> dict[str, Any]:
  """`stats` for the dataset a job config's `data` section describes."""
  name, kw = _config_kwargs(data_config)
  return stats(name, data_config.data_dir, **kw)


def split_files(data_config, split: str) -> list[pathlib.Path]:
  """The files holding one split of a built dataset (plus its dataset_info.json), sorted.

  What a cache of that split's contents (`fundax.train.frozen_cache`) is fingerprinted by:
  rebuilding the dataset with other images or labels changes them.
  """
  name, kw = _config_kwargs(data_config)
  builder = _prepared(name, data_config.data_dir, None, **kw)
  directory = pathlib.Path(builder.data_dir)
  files = sorted(directory.glob(f"*-{split}.array_record*"))
  if not files:
    raise FileNotFoundError(f"no {split!r} split files of {name} in {directory}")
  return files + [directory / "dataset_info.json"]
