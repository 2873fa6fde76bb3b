"""Builders for the real diabetic-retinopathy grading datasets: EyePACS, APTOS 2019, IDRiD,
EyeQ and Messidor-2.

Each reads its CSV annotations from the user's `manual_dir` (layout in the class docstring and
`MANUAL_DOWNLOAD_INSTRUCTIONS`), maps its grades to `FundusLabels` (ICDR DR grade, DME, EyeQ
quality, laterality where the file name gives it) and leaves everything else unknown, so the
captions state only what the dataset graded. Bad files, splits and the build summary are
handled by `manual.ManualBuilder`.
"""

from __future__ import annotations

import pathlib

from fundax.data import labels as labels_lib
from fundax.data.builders import manual

FundusLabels = labels_lib.FundusLabels


def _grade(path: pathlib.Path, row: dict[str, str], column: str) -> int | None:
  """An integer grade from a CSV cell ("2" or "2.0"); None for an empty cell."""
  value = row[column]
  if not value:
    return None
  try:
    return int(float(value))
  except ValueError as e:
    raise ValueError(f"{path}: bad {column!r} value {value!r} in row {row}") from e


class Eyepacs(manual.ManualBuilder):
  """EyePACS / Kaggle Diabetic Retinopathy Detection (2015): ICDR grades of ~35k train images.

  manual_dir layout (from kaggle.com/c/diabetic-retinopathy-detection, unzipped):
    trainLabels.csv              columns image,level (image like "10_left")
    train/10_left.jpeg ...
    retinopathy_solution.csv     optional: the test labels released after the competition
    test/1_left.jpeg ...         (columns image,level,Usage); gives a "test" split

  Splits: "train" and "validation" (hash of the patient id, so both eyes stay together), and
  "test" when the solution file is present. Laterality comes from the file name.
  """

  HOMEPAGE = "https://www.kaggle.com/c/diabetic-retinopathy-detection"
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _read(self, root: pathlib.Path, csv_name: str, folder: str) -> list[manual.Entry]:
    path = root / csv_name
    rows = manual.read_csv(path)
    manual.require_columns(path, rows, ("image", "level"))
    return [
        manual.Entry(
            id=row["image"],
            path=root / folder / f"{row['image']}.jpeg",
            labels=FundusLabels(
                laterality=manual.laterality_from_name(row["image"]),
                dr_grade=_grade(path, row, "level")),
            group=row["image"].split("_")[0],
        ) for row in rows
    ]

  def _read_splits(self, root):
    splits = manual.split_by_hash(self._read(root, "trainLabels.csv", "train"),
                                  self.validation_fraction)
    if (root / "retinopathy_solution.csv").is_file():
      splits["test"] = self._read(root, "retinopathy_solution.csv", "test")
    return splits


class Aptos2019(manual.ManualBuilder):
  """APTOS 2019 Blindness Detection: ICDR grades of 3,662 images from Aravind Eye Hospital.

  manual_dir layout (from kaggle.com/c/aptos2019-blindness-detection, unzipped):
    train.csv                    columns id_code,diagnosis
    train_images/<id_code>.png

  Splits: "train" and "validation" (hash of id_code); the Kaggle test set has no labels.
  """

  HOMEPAGE = "https://www.kaggle.com/c/aptos2019-blindness-detection"
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _read_splits(self, root):
    path = root / "train.csv"
    rows = manual.read_csv(path)
    manual.require_columns(path, rows, ("id_code", "diagnosis"))
    entries = [
        manual.Entry(
            id=row["id_code"],
            path=root / "train_images" / f"{row['id_code']}.png",
            labels=FundusLabels(dr_grade=_grade(path, row, "diagnosis")),
        ) for row in rows
    ]
    return manual.split_by_hash(entries, self.validation_fraction)


class Idrid(manual.ManualBuilder):
  """IDRiD, Indian Diabetic Retinopathy Image Dataset, part B (disease grading): 516 images
  with ICDR grades and risk of macular oedema (0-2).

  manual_dir layout (from
  ieee-dataport.org/open-access/indian-diabetic-retinopathy-image-dataset-idrid):
    B. Disease Grading/
      1. Original Images/a. Training Set/IDRiD_001.jpg ...
      1. Original Images/b. Testing Set/IDRiD_001.jpg ...
      2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv
      2. Groundtruths/b. IDRiD_Disease Grading_Testing Labels.csv
  (manual_dir may also be the "B. Disease Grading" folder itself.) CSV columns "Image name",
  "Retinopathy grade", "Risk of macular edema " (trailing space tolerated).

  Splits: the dataset's own "train" and "test". DME is "risk > 0".
  """

  HOMEPAGE = "https://idrid.grand-challenge.org/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
  _PARTS = {
      "train": ("a. IDRiD_Disease Grading_Training Labels.csv", "a. Training Set"),
      "test": ("b. IDRiD_Disease Grading_Testing Labels.csv", "b. Testing Set"),
  }

  def _read_splits(self, root):
    base = root / "B. Disease Grading"
    if not base.is_dir() and (root / "2. Groundtruths").is_dir():
      base = root
    splits = {}
    for split, (csv_name, folder) in self._PARTS.items():
      path = base / "2. Groundtruths" / csv_name
      rows = manual.read_csv(path)
      columns = ("Image name", "Retinopathy grade", "Risk of macular edema")
      manual.require_columns(path, rows, columns)
      splits[split] = []
      for row in rows:
        risk = _grade(path, row, "Risk of macular edema")
        splits[split].append(manual.Entry(
            id=row["Image name"],
            path=base / "1. Original Images" / folder / f"{row['Image name']}.jpg",
            labels=FundusLabels(
                dr_grade=_grade(path, row, "Retinopathy grade"),
                dme=None if risk is None else risk > 0),
        ))
    return splits


class Eyeq(manual.ManualBuilder):
  """EyeQ: 28,792 EyePACS images graded for quality (good / usable / reject) with DR grades.

  manual_dir layout (labels from github.com/HzFu/EyeQ, images from EyePACS):
    Label_EyeQ_train.csv         columns: unnamed index, image, quality, DR_grade
    Label_EyeQ_test.csv
    train/<image> ...            file names as in the CSV (e.g. 10_left.jpeg)
    test/<image> ...

  Splits: the dataset's own "train" and "test". Quality 0/1/2 maps to good/usable/reject;
  laterality comes from names ending in _left/_right.
  """

  HOMEPAGE = "https://github.com/HzFu/EyeQ"
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _read_splits(self, root):
    splits = {}
    for split in ("train", "test"):
      path = root / f"Label_EyeQ_{split}.csv"
      rows = manual.read_csv(path)
      manual.require_columns(path, rows, ("image", "quality", "DR_grade"))
      splits[split] = []
      for row in rows:
        quality = _grade(path, row, "quality")
        if quality not in (None, 0, 1, 2):
          raise ValueError(f"{path}: quality must be 0, 1 or 2, got {row['quality']!r}")
        splits[split].append(manual.Entry(
            id=row["image"].rsplit(".", 1)[0],
            path=root / split / row["image"],
            labels=FundusLabels(
                laterality=manual.laterality_from_name(row["image"]),
                quality=None if quality is None else labels_lib.QUALITIES[quality],
                dr_grade=_grade(path, row, "DR_grade")),
        ))
    return splits


class Messidor2(manual.ManualBuilder):
  """Messidor-2: 1,748 images with adjudicated ICDR grades, DME and gradability (Krause et al.).

  manual_dir layout (images from adcis.net/en/third-party/messidor2, adjudicated grades from
  kaggle.com/datasets/google-brain/messidor2-dr-grades):
    messidor_data.csv            columns image_id, adjudicated_dr_grade, adjudicated_dme,
                                 adjudicated_gradable
    IMAGES/<image_id> ...        image_id includes the extension (e.g. 20051020_43808_0100_PP.png);
                                 its case may differ (IM000001.jpg in the CSV, .JPG on disk)

  Splits: "train" and "validation" (hash of image_id). Ungradable images get quality "reject"
  and unknown DR grade and DME.
  """

  HOMEPAGE = "https://www.adcis.net/en/third-party/messidor2/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _read_splits(self, root):
    path = root / "messidor_data.csv"
    rows = manual.read_csv(path)
    columns = ("image_id", "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable")
    manual.require_columns(path, rows, columns)
    images = manual.file_index(root / "IMAGES")
    entries = []
    for row in rows:
      gradable = _grade(path, row, "adjudicated_gradable")
      dme = _grade(path, row, "adjudicated_dme")
      if gradable == 0:
        labels = FundusLabels(quality="reject")
      else:
        labels = FundusLabels(
            dr_grade=_grade(path, row, "adjudicated_dr_grade"),
            dme=None if dme is None else dme > 0)
      entries.append(manual.Entry(
          id=row["image_id"].rsplit(".", 1)[0],
          path=images.get(row["image_id"].lower(), root / "IMAGES" / row["image_id"]),
          labels=labels))
    return manual.split_by_hash(entries, self.validation_fraction)
