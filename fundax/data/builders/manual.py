"""The base of every builder for a real fundus dataset that the user downloads by hand.

fundax never downloads patient data: the user places the dataset in `manual_dir` (each builder
documents the layout it expects) and the builder maps the dataset's own labels to
`FundusLabels`, then writes the common feature schema (`features.py`).

A subclass only reads its annotation files into `Entry`s per split (`_read_splits`). This base
checks the inputs and owns what happens to bad files:
  * a missing `manual_dir` or annotation file raises `FileNotFoundError` naming the path;
  * an image listed but absent, or present but not decodable, raises naming the file when
    `skip_bad=False`; with `skip_bad=True` (the default) it is skipped and counted. Either way
    nothing is dropped silently: the counts and the names of the skipped files are logged and
    saved as `build_summary.json` in the dataset directory (`read_summary`).

Datasets without their own validation split hold one out by hashing a stable key (the patient
id where the dataset has one, so both eyes of a patient land in the same split).
"""

from __future__ import annotations

import abc
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import pathlib
from typing import Iterable, Iterator, Mapping

from PIL import Image
import tensorflow_datasets as tfds

from fundax.data import labels as labels_lib
from fundax.data.builders import features

SUMMARY_FILE = "build_summary.json"
_LOG_NAMES = 20  # skipped files named in the log; the summary file names all of them


@dataclasses.dataclass(frozen=True)
class Entry:
  """One image listed by a dataset's annotations."""

  id: str  # stable example id (usually the file name without extension)
  path: pathlib.Path  # where the annotation says the image is
  labels: labels_lib.FundusLabels
  group: str | None = None  # hash key for the held-out split (patient id); None: use `id`


class BadImageError(ValueError):
  """An image file that exists but cannot be decoded."""


def read_image(path: pathlib.Path) -> bytes:
  """The encoded bytes of an RGB image file, after checking that it decodes.

  JPEG/PNG files that already decode to RGB are returned as they are (no recompression);
  greyscale, palette or RGBA files are converted to RGB and re-encoded as PNG, because the
  schema promises three channels.

  Args:
    path: the image file.

  Returns:
    Encoded image bytes.

  Raises:
    FileNotFoundError: the file does not exist.
    BadImageError: the file cannot be decoded as an image (corrupt or truncated).
  """
  data = path.read_bytes()
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # decodes every pixel: catches truncated files that open() accepts
      if image.mode == "RGB":
        return data
      buffer = io.BytesIO()
      image.convert("RGB").save(buffer, format="PNG")
      return buffer.getvalue()
  except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for corrupt data
    raise BadImageError(f"{path}: not a decodable image ({e})") from e


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
  """Rows of a CSV file as dicts, with header names and cells stripped of whitespace.

  Args:
    path: the CSV file (UTF-8, optionally with a byte-order mark).

  Returns:
    One dict per non-empty row.

  Raises:
    FileNotFoundError: naming `path` when it does not exist.
  """
  if not path.is_file():
    raise FileNotFoundError(f"annotation file not found: {path}")
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader, [])]
    rows = []
    for cells in reader:
      row = {h: c.strip() for h, c in zip(header, cells) if h}
      if any(row.values()):
        rows.append(row)
  return rows


def require_columns(path: pathlib.Path, rows: list[dict[str, str]], columns: Iterable[str]):
  """Raises a ValueError naming `path` if its rows lack any of `columns`."""
  missing = [c for c in columns if rows and c not in rows[0]]
  if missing:
    raise ValueError(f"{path}: missing columns {missing}; found {sorted(rows[0])}")


def held_out(key: str, fraction: float) -> bool:
  """Whether `key` falls in the held-out fraction: a stable hash, the same on every machine."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_by_hash(entries: Iterable[Entry], fraction: float) -> dict[str, list[Entry]]:
  """Splits entries into "train" and "validation" by hashing each entry's group (or id).

  Args:
    entries: the entries of a dataset without its own validation split.
    fraction: expected fraction held out for validation.

  Returns:
    {"train": [...], "validation": [...]}, each in input order.
  """
  splits = {"train": [], "validation": []}
  for entry in entries:
    key = entry.group if entry.group is not None else entry.id
    splits["validation" if held_out(key, fraction) else "train"].append(entry)
  return splits


def file_index(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """Files of `folder` by lower-cased name (empty when the folder does not exist).

  Some annotation files spell extensions differently from the archive they describe
  (Messidor-2's CSV has "IM000001.jpg", the images are "IM000001.JPG"); on a case-sensitive
  file system the images would all look missing.
  """
  if not folder.is_dir():
    return {}
  return {p.name.lower(): p for p in folder.iterdir()}


def laterality_from_name(name: str) -> str | None:
  """ "right"/"left" for names ending in _right/_left (EyePACS style), else None."""
  stem = name.rsplit(".", 1)[0].lower()
  for side in labels_lib.LATERALITIES:
    if stem.endswith("_" + side):
      return side
  return None


def read_summary(dataset_dir: str | os.PathLike) -> dict | None:
  """The saved build summary of a prepared dataset (`builder.data_dir`); None if it has none."""
  path = pathlib.Path(dataset_dir) / SUMMARY_FILE
  if not path.is_file():
    return None
  return json.loads(path.read_text())


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A real dataset read from `manual_dir`; subclasses implement `_read_splits`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  HOMEPAGE = ""

  def __init__(self, *, skip_bad: bool = True, validation_fraction: float = 0.1, **kwargs):
    """Creates the builder.

    Args:
      skip_bad: True: skip missing/corrupt images, counting and naming them in the build
        summary; False: raise on the first one, naming the file.
      validation_fraction: share of the data held out (by hash) as "validation" when the
        dataset has no validation split of its own.
      **kwargs: `tfds.core.GeneratorBasedBuilder` arguments (data_dir, config, ...).
    """
    if not 0.0 <= validation_fraction < 1.0:
      raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    self.skip_bad = skip_bad
    self.validation_fraction = validation_fraction
    self._summary = None
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=self.__doc__,
        features=features.make_features((None, None, 3)),
        homepage=self.HOMEPAGE,
    )

  @abc.abstractmethod
  def _read_splits(self, root: pathlib.Path) -> Mapping[str, list[Entry]]:
    """Reads the annotations under `root` into entries per split name."""

  def _split_generators(self, dl_manager):
    try:
      root = pathlib.Path(dl_manager.manual_dir)
    except AssertionError as e:  # TFDS reports a missing/empty manual_dir this way
      raise FileNotFoundError(str(e)) from e
    splits = self._read_splits(root)
    generators = {}
    for split, entries in splits.items():
      if not entries:
        logging.warning("%s: split %r has no entries; not written", self.name, split)
        continue
      generators[split] = self._generate_examples(split, entries)
    return generators

  def _generate_examples(self, split: str, entries: list[Entry]) -> Iterator:
    self._summary["written"].setdefault(split, 0)
    self._summary["skipped"].setdefault(split, 0)
    for entry in entries:
      try:
        image = read_image(entry.path)
      except (FileNotFoundError, BadImageError) as e:
        if not self.skip_bad:
          raise
        reason = "missing" if isinstance(e, FileNotFoundError) else "corrupt"
        self._summary["skipped"][split] += 1
        self._summary["skipped_files"].append(
            {"split": split, "id": entry.id, "file": str(entry.path), "reason": reason})
        continue
      self._summary["written"][split] += 1
      yield entry.id, features.make_example(entry.id, image, entry.labels, synthetic=False)
    if not self._summary["written"][split]:
      # TFDS cannot write an empty split; say why instead of letting its writer fail.
      bad = [s["file"] for s in self._summary["skipped_files"] if s["split"] == split]
      raise ValueError(
          f"{self.name}: every image of split {split!r} is missing or corrupt, e.g. {bad[:3]}")

  def _download_and_prepare(self, dl_manager, download_config):
    self._summary = {
        "dataset": self.name,
        "config": self.builder_config.name if self.builder_config else None,
        "skip_bad": self.skip_bad,
        "written": {},
        "skipped": {},
        "skipped_files": [],
    }
    super()._download_and_prepare(dl_manager, download_config)
    # self.data_dir is TFDS's temporary directory here; it is renamed into place on success.
    path = pathlib.Path(self.data_dir) / SUMMARY_FILE
    path.write_text(json.dumps(self._summary, indent=1, sort_keys=True))
    _log_summary(self._summary)


def _log_summary(summary: dict) -> None:
  skipped = summary["skipped_files"]
  logging.info("%s: wrote %s examples per split", summary["dataset"], summary["written"])
  if skipped:
    names = ", ".join(f"{s['file']} ({s['reason']})" for s in skipped[:_LOG_NAMES])
    more = f" and {len(skipped) - _LOG_NAMES} more" if len(skipped) > _LOG_NAMES else ""
    logging.warning("%s: skipped %d bad image files: %s%s (all listed in %s)",
                    summary["dataset"], len(skipped), names, more, SUMMARY_FILE)
