"""Builder for ODIR-5K (Ocular Disease Intelligent Recognition): 5,000 patients, both eyes,
with free-text diagnostic keywords per eye.

The per-eye keywords are kept as `FundusLabels.keywords`; a keyword naming a DR stage also sets
the ICDR grade, and "normal fundus" marks the eye healthy. The patient-level N/D/G/C/A/H/M/O
columns are not used: they describe the patient, not the eye in the image.
"""

from __future__ import annotations

import pathlib
import re

from fundax.data import labels as labels_lib
from fundax.data.builders import manual

FundusLabels = labels_lib.FundusLabels

COLUMNS = (
    "ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus",
    "Left-Diagnostic Keywords", "Right-Diagnostic Keywords",
    "N", "D", "G", "C", "A", "H", "M", "O",
)
# Looked up after `_normalise` (lower case, "non proliferative" spelled as one word).
DR_KEYWORDS = {
    "mild nonproliferative retinopathy": 1,
    "moderate nonproliferative retinopathy": 2,
    "severe nonproliferative retinopathy": 3,
    "proliferative diabetic retinopathy": 4,
    "normal fundus": 0,
}
NORMAL = "normal fundus"
# Annotation files tried in order: Kaggle's CSV export first, then the official spreadsheet.
ANNOTATION_FILES = (
    "full_df.csv",
    "ODIR-5K_Training_Annotations(Updated)_V2.csv",
    "ODIR-5K_Training_Annotations(Updated)_V2.xlsx",
    "data.xlsx",
)
IMAGE_DIRS = (
    "ODIR-5K_Training_Dataset",
    "Training Images",
    "ODIR-5K/Training Images",
    "preprocessed_images",
)


def split_keywords(text: str) -> tuple[str, ...]:
  """Keywords of one eye: the cell split on the full-width "，" and on ","."""
  return tuple(k.strip() for k in re.split(r"[，,]", text) if k.strip())


def _normalise(keyword: str) -> str:
  keyword = " ".join(keyword.lower().split())
  return re.sub(r"non[ -]proliferative", "nonproliferative", keyword)


def eye_labels(side: str, keywords: tuple[str, ...]) -> FundusLabels:
  """`FundusLabels` of one eye from its ODIR diagnostic keywords.

  Args:
    side: "left" or "right".
    keywords: the eye's keywords (`split_keywords`).

  Returns:
    Labels with laterality and keywords; dr_grade where a keyword names a DR stage (the worst
    one when several do); a "normal fundus" eye is healthy: no DR, DME, glaucoma, AMD,
    hypertensive retinopathy or findings.
  """
  normalised = [_normalise(k) for k in keywords]
  grades = [DR_KEYWORDS[k] for k in normalised if k in DR_KEYWORDS]
  labels = dict(laterality=side, keywords=keywords, dr_grade=max(grades) if grades else None)
  if NORMAL in normalised:
    labels.update(dme=False, glaucoma=False, amd_stage=0, hypertensive_grade=0, findings={})
  return FundusLabels(**labels)


def read_annotations(path: pathlib.Path) -> list[dict[str, str]]:
  """Rows of the ODIR annotation file (.csv, or .xlsx when openpyxl is installed).

  Args:
    path: the annotation file.

  Returns:
    One dict per row, keyed by the stripped column names.
  """
  if path.suffix.lower() == ".csv":
    rows = manual.read_csv(path)
  else:
    rows = _read_xlsx(path)
  manual.require_columns(path, rows, COLUMNS[:7])
  return rows


def _read_xlsx(path: pathlib.Path) -> list[dict[str, str]]:
  try:
    import openpyxl  # pylint: disable=g-import-not-at-top  # optional dependency
  except ImportError as e:
    raise ImportError(
        f"reading {path} needs openpyxl (pip install openpyxl); or export the sheet as CSV "
        f"and place it in the manual_dir as full_df.csv") from e
  sheet = openpyxl.load_workbook(path, read_only=True, data_only=True).active
  lines = sheet.iter_rows(values_only=True)
  header = [str(h).strip() if h is not None else "" for h in next(lines, ())]
  rows = []
  for cells in lines:
    row = {h: "" if c is None else str(c).strip() for h, c in zip(header, cells) if h}
    if any(row.values()):
      rows.append(row)
  return rows


class Odir5k(manual.ManualBuilder):
  """ODIR-5K: colour fundus photographs of both eyes of 5,000 patients with per-eye keywords.

  manual_dir layout (from odir2019.grand-challenge.org, or the Kaggle re-upload
  "ocular-disease-recognition-odir5k"), one annotation file and one image folder:
    full_df.csv (Kaggle), or ODIR-5K_Training_Annotations(Updated)_V2.csv / .xlsx / data.xlsx
      columns ID, Patient Age, Patient Sex, Left-Fundus, Right-Fundus,
      Left-Diagnostic Keywords, Right-Diagnostic Keywords, N, D, G, C, A, H, M, O
      (.xlsx needs openpyxl; a CSV export of the sheet works without it)
    ODIR-5K_Training_Dataset/ or Training Images/ or ODIR-5K/Training Images/ or
    preprocessed_images/, holding 0_left.jpg, 0_right.jpg ...

  Splits: "train" and "validation" (hash of the patient ID, so both eyes stay together).
  Rows that repeat an image (full_df.csv lists each patient once per eye) are read once.
  """

  HOMEPAGE = "https://odir2019.grand-challenge.org/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _read_splits(self, root):
    annotation = next((root / n for n in ANNOTATION_FILES if (root / n).is_file()), None)
    if annotation is None:
      raise FileNotFoundError(
          f"no ODIR annotation file in {root}; expected one of {list(ANNOTATION_FILES)}")
    image_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), None)
    if image_dir is None:
      raise FileNotFoundError(f"no ODIR image folder in {root}; expected one of {list(IMAGE_DIRS)}")
    entries, seen = [], set()
    for row in read_annotations(annotation):
      for side in labels_lib.LATERALITIES:
        name = row[f"{side.capitalize()}-Fundus"]
        if not name or name in seen:
          continue
        seen.add(name)
        keywords = split_keywords(row[f"{side.capitalize()}-Diagnostic Keywords"])
        entries.append(manual.Entry(
            id=name.rsplit(".", 1)[0], path=image_dir / name,
            labels=eye_labels(side, keywords), group=row["ID"]))
    return manual.split_by_hash(entries, self.validation_fraction)
