"""Real-dataset builders on tiny fake downloads written in the datasets' own layouts.

Each test writes real JPEG/PNG files and the real CSV header names into tmp_path, builds the
dataset with TFDS (array_record, no TensorFlow) and reads it back.
"""

import csv
import json
import pathlib
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from fundax.data import captions
from fundax.data import datasets
from fundax.data.builders import dr_grading
from fundax.data.builders import features
from fundax.data.builders import manual
from fundax.data.builders import odir5k


def _image(path: pathlib.Path, value: int = 100, mode: str = "RGB", size=(12, 10)):
  path.parent.mkdir(parents=True, exist_ok=True)
  channels = {"RGB": 3, "RGBA": 4}[mode]
  array = np.full((size[1], size[0], channels), value, np.uint8)
  array[..., 0] = np.arange(size[0], dtype=np.uint8)[None, :] * 10  # not a flat image
  Image.fromarray(array, mode).save(path)


def _corrupt(path: pathlib.Path):
  """A JPEG cut short: PIL opens the header but cannot decode the pixels."""
  _image(path)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def _csv(path: pathlib.Path, header, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def _build(cls, tmp_path, manual_dir, **kw):
  builder = cls(data_dir=str(tmp_path / "data"), validation_fraction=0.5, **kw)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _read(builder) -> dict[str, dict[str, dict]]:
  """{split: {id: decoded example}}."""
  out = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split=split)
    out[split] = {d["id"]: d for d in map(features.decode_example, source)}
  return out


def _eyepacs_download(root: pathlib.Path) -> pathlib.Path:
  rows = [(f"{p}_{side}", (p + (side == "left")) % 5) for p in (10, 13, 15, 16, 17)
          for side in ("left", "right")]
  _csv(root / "trainLabels.csv", ["image", "level"], rows)
  for name, level in rows:
    _image(root / "train" / f"{name}.jpeg", value=40 * level)
  (root / "train" / "16_left.jpeg").unlink()  # listed but missing
  _corrupt(root / "train" / "17_right.jpeg")
  _csv(root / "retinopathy_solution.csv", ["image", "level", "Usage"],
       [("1_left", 0, "Public"), ("1_right", 4, "Private")])
  _image(root / "test" / "1_left.jpeg")
  _image(root / "test" / "1_right.jpeg")
  return root


def test_eyepacs_labels_splits_and_bad_files_summary(tmp_path):
  builder = _build(dr_grading.Eyepacs, tmp_path, _eyepacs_download(tmp_path / "manual"))
  data = _read(builder)

  trainval = {**data["train"], **data.get("validation", {})}
  assert len(trainval) == 8 and "16_left" not in trainval and "17_right" not in trainval
  ex = trainval["13_left"]
  assert ex["labels"].dr_grade == (13 + 1) % 5 and ex["labels"].laterality == "left"
  assert trainval["15_right"]["labels"].laterality == "right"
  assert ex["caption"] == captions.caption(ex["labels"], 0)
  assert ex["image"].shape == (10, 12, 3) and not ex["synthetic"]
  # Both eyes of a patient land in the same split (hash of the patient id).
  for split, examples in data.items():
    for name in examples:
      twin = name.replace("left", "right") if "left" in name else name.replace("right", "left")
      assert twin in examples or twin in ("16_left", "17_right"), (split, name)
  assert {k: v["labels"].dr_grade for k, v in data["test"].items()} == {"1_left": 0, "1_right": 4}

  summary = manual.read_summary(builder.data_dir)
  assert sum(summary["written"].values()) == 10
  assert sum(summary["skipped"].values()) == 2
  skipped = {pathlib.Path(s["file"]).name: s["reason"] for s in summary["skipped_files"]}
  assert skipped == {"16_left.jpeg": "missing", "17_right.jpeg": "corrupt"}


@pytest.mark.parametrize("bad_name, error", [("16_left.jpeg", FileNotFoundError),
                                             ("17_right.jpeg", manual.BadImageError)])
def test_strict_mode_raises_naming_the_file(tmp_path, bad_name, error):
  root = _eyepacs_download(tmp_path / "manual")
  # Leave only one bad file so the error must name that one.
  other = "17_right.jpeg" if bad_name == "16_left.jpeg" else "16_left.jpeg"
  _image(root / "train" / other)
  with pytest.raises(error, match=bad_name):
    _build(dr_grading.Eyepacs, tmp_path, root, skip_bad=False)


def test_missing_csv_and_missing_manual_dir_raise_naming_the_path(tmp_path):
  root = tmp_path / "manual"
  _image(root / "train_images" / "a.png")
  with pytest.raises(FileNotFoundError, match="train.csv"):
    _build(dr_grading.Aptos2019, tmp_path, root)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    _build(dr_grading.Aptos2019, tmp_path, tmp_path / "nowhere")


def test_aptos_png_grades_and_rgba_converted(tmp_path):
  root = tmp_path / "manual"
  rows = [("000c1434d8d7", 2), ("001639a390f0", 4), ("0024cdab0c1e", 1), ("002c21358ce6", 0)]
  _csv(root / "train.csv", ["id_code", "diagnosis"], rows)
  for name, _ in rows:
    _image(root / "train_images" / f"{name}.png")
  _image(root / "train_images" / "002c21358ce6.png", mode="RGBA")
  data = _read(_build(dr_grading.Aptos2019, tmp_path, root))
  examples = {k: v for split in data.values() for k, v in split.items()}
  assert {k: v["labels"].dr_grade for k, v in examples.items()} == dict(rows)
  assert examples["002c21358ce6"]["image"].shape == (10, 12, 3)
  for split, ids in data.items():  # the held-out split is the hash of the id
    assert all(manual.held_out(i, 0.5) == (split == "validation") for i in ids)


def test_idrid_trailing_space_header_dme_and_own_splits(tmp_path):
  base = tmp_path / "manual" / "B. Disease Grading"
  header = ["Image name", "Retinopathy grade", "Risk of macular edema "]
  for part, folder, rows in (
      ("a. IDRiD_Disease Grading_Training Labels.csv", "a. Training Set",
       [("IDRiD_001", 3, 2), ("IDRiD_002", 0, 0)]),
      ("b. IDRiD_Disease Grading_Testing Labels.csv", "b. Testing Set",
       [("IDRiD_001", 4, 1)]),
  ):
    _csv(base / "2. Groundtruths" / part, header, rows)
    for name, _, _ in rows:
      _image(base / "1. Original Images" / folder / f"{name}.jpg")
  data = _read(_build(dr_grading.Idrid, tmp_path, tmp_path / "manual"))
  assert set(data) == {"train", "test"}
  assert data["train"]["IDRiD_001"]["labels"].dr_grade == 3
  assert data["train"]["IDRiD_001"]["labels"].dme is True
  assert data["train"]["IDRiD_002"]["labels"].dme is False
  assert data["test"]["IDRiD_001"]["labels"].dr_grade == 4


def test_eyeq_quality_dr_grade_and_laterality(tmp_path):
  root = tmp_path / "manual"
  header = ["", "image", "quality", "DR_grade"]
  _csv(root / "Label_EyeQ_train.csv", header,
       [(0, "10_left.jpeg", 0, 0), (1, "10_right.jpeg", 2, 1), (2, "99.jpeg", 1, 3)])
  _csv(root / "Label_EyeQ_test.csv", header, [(0, "1_left.jpeg", 1, 2)])
  for split, name in (("train", "10_left"), ("train", "10_right"), ("train", "99"),
                      ("test", "1_left")):
    _image(root / split / f"{name}.jpeg")
  data = _read(_build(dr_grading.Eyeq, tmp_path, root))
  got = {k: (v["labels"].quality, v["labels"].dr_grade, v["labels"].laterality)
         for k, v in data["train"].items()}
  assert got == {"10_left": ("good", 0, "left"), "10_right": ("reject", 1, "right"),
                 "99": ("usable", 3, None)}
  assert data["test"]["1_left"]["labels"].quality == "usable"


def test_messidor2_ungradable_is_reject(tmp_path):
  root = tmp_path / "manual"
  _csv(root / "messidor_data.csv",
       ["image_id", "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable"],
       [("20051020_43808_0100_PP.png", 2, 1, 1), ("IM000001.jpg", "", "", 0),
        ("IM000002.jpg", 0, 0, 1)])  # the CSV's .jpg are .JPG on disk
  _image(root / "IMAGES" / "20051020_43808_0100_PP.png")
  _image(root / "IMAGES" / "IM000001.JPG")
  _image(root / "IMAGES" / "IM000002.JPG")
  data = _read(_build(dr_grading.Messidor2, tmp_path, root))
  examples = {k: v["labels"] for split in data.values() for k, v in split.items()}
  assert (examples["20051020_43808_0100_PP"].dr_grade, examples["20051020_43808_0100_PP"].dme) \
      == (2, True)
  assert examples["IM000001"].quality == "reject" and examples["IM000001"].dr_grade is None
  assert (examples["IM000002"].dr_grade, examples["IM000002"].dme) == (0, False)


def _odir_download(root: pathlib.Path) -> pathlib.Path:
  header = list(odir5k.COLUMNS)
  flags = [0] * 8
  rows = [
      (0, 69, "Female", "0_left.jpg", "0_right.jpg",
       "cataract", "normal fundus", *flags),
      (1, 57, "Male", "1_left.jpg", "1_right.jpg",
       "moderate non proliferative retinopathy，laser spot", "normal fundus", *flags),
      (2, 42, "Male", "2_left.jpg", "2_right.jpg",
       "proliferative diabetic retinopathy,mild nonproliferative retinopathy", "lens dust",
       *flags),
  ]
  rows.append(rows[1])  # full_df.csv lists each patient once per eye
  _csv(root / "full_df.csv", header, rows)
  for patient in range(3):
    for side in ("left", "right"):
      _image(root / "preprocessed_images" / f"{patient}_{side}.jpg")
  return root


def test_odir_keywords_dr_grade_and_healthy_eyes(tmp_path):
  data = _read(_build(odir5k.Odir5k, tmp_path, _odir_download(tmp_path / "manual")))
  labels = {k: v["labels"] for split in data.values() for k, v in split.items()}
  assert len(labels) == 6
  assert labels["1_left"].keywords == ("moderate non proliferative retinopathy", "laser spot")
  assert labels["1_left"].dr_grade == 2 and labels["1_left"].laterality == "left"
  assert labels["2_left"].dr_grade == 4  # the worst stage named
  assert labels["0_left"].dr_grade is None and labels["2_right"].dr_grade is None
  healthy = labels["0_right"]
  assert (healthy.dr_grade, healthy.glaucoma, healthy.findings) == (0, False, {})
  assert healthy.laterality == "right"
  for examples in data.values():  # both eyes of a patient in one split
    assert {k.split("_")[0] for k in examples}.isdisjoint(
        {k.split("_")[0] for s in data.values() if s is not examples for k in s})


def test_odir_xlsx_without_openpyxl_says_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "openpyxl", None)  # makes `import openpyxl` fail
  path = tmp_path / "data.xlsx"
  path.write_bytes(b"PK")
  with pytest.raises(ImportError, match="openpyxl"):
    odir5k.read_annotations(path)


def test_odir_xlsx_annotation(tmp_path):
  import openpyxl  # pylint: disable=g-import-not-at-top  # a test extra
  root = _odir_download(tmp_path / "manual")
  with open(root / "full_df.csv", newline="", encoding="utf-8") as f:
    table = list(csv.reader(f))
  (root / "full_df.csv").unlink()
  book = openpyxl.Workbook()
  for row in table:
    book.active.append([int(c) if c.isdigit() else c for c in row])
  book.save(root / "data.xlsx")
  rows = odir5k.read_annotations(root / "data.xlsx")
  assert len(rows) == 4 and rows[1]["Left-Fundus"] == "1_left.jpg" and rows[1]["ID"] == "1"


def test_datasets_build_and_stats_with_summary(tmp_path):
  root = _eyepacs_download(tmp_path / "manual")
  builder = datasets.build("eyepacs", str(tmp_path / "data"), str(root))
  assert len(datasets.load("eyepacs", "test", str(tmp_path / "data"))) == 2
  st = datasets.stats("eyepacs", str(tmp_path / "data"))
  assert st["total"]["num_examples"] == 10
  assert sum(s["num_examples"] for s in st["splits"].values()) == 10
  assert st["total"]["laterality"] == {"left": 5, "right": 5}
  assert st["total"]["synthetic"] == {"false": 10}
  assert st["total"]["quality"] == {"unknown": 10}
  assert st["splits"]["test"]["dr_grade"] == {"0": 1, "4": 1}
  assert len(st["build_summary"]["skipped_files"]) == 2
  saved = json.loads((pathlib.Path(builder.data_dir) / manual.SUMMARY_FILE).read_text())
  assert saved == st["build_summary"]


def test_unknown_dataset_lists_known_names():
  with pytest.raises(ValueError, match="aptos2019.*eyepacs"):
    datasets.build("kaggle_dr", "/nonexistent")
