"""The Selector's training and held-out data: graded images and human ratings in one table.

This module owns turning every label source into rows of one `Examples` table, and sampling
the mixed, masked batches that `fundax.selector.losses.selector_loss` consumes:

  * graded datasets: the phantom rendered in process, or any fundax TFDS source (EyeQ's
    Good/Usable/Reject, the phantom dataset). Grade -> accept target: good 1, usable
    `usable_target` (soft), reject 0. The phantom's `quality_defects` give the image criteria
    (`DEFECT_CRITERIA`); its own caption gives prompt_match True, and with `mismatch_fraction`
    a copy paired with another image's caption gives prompt_match False (only that label).
    Captions are written without the quality grade and defects: a prompt never states the
    answer;
  * human ratings (`fundax.selector.ratings`): score -> `(score - 1) / 4`, accept, criteria
    flags, rater weights; pairwise preferences become pairs of rows.

Every row carries a binary held-out label `eval_label` (1 accept, 0 reject, -1 none): the
accept flag when given, else the score (> 3 accept, < 3 reject, 3 none); for graded rows good 1,
reject 0, usable none. Images are stored once as uint8 and converted per batch. Batches are a
pure function of (seed, step), so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from fundax.data import captions
from fundax.data import labels as labels_lib
from fundax.data import phantom
from fundax.data import pipeline
from fundax.models.selector import CRITERIA
from fundax.selector import losses
from fundax.selector import ratings as ratings_lib

log = logging.getLogger(__name__)

# Which quality defects violate each image criterion (a criterion is met when none is present).
DEFECT_CRITERIA = {
    "optic_disc_clarity": ("defocus", "overexposure", "underexposure"),
    "vessel_structure": ("defocus", "underexposure", "eyelash_artifact"),
    "contrast_illumination": ("uneven_illumination", "underexposure", "overexposure",
                              "off_centre"),
    "artifacts": ("eyelash_artifact", "dust_artifact"),
}
GRADE_TARGETS = {"good": 1.0, "reject": 0.0}  # "usable" takes the configured soft target
ROW_FIELDS = ("image_index", "accept", "accept_mask", "score_target", "score_mask",
              "criteria", "criteria_mask", "weight", "eval_label")
PAIR_FIELDS = ("a", "b", "target", "weight")


@dataclasses.dataclass
class Examples:
  """Host-side labelled data: unique images, single rows and pairs of rows.

  Attributes:
    images: uint8 `[M, R, R, 3]`.
    rows: ROW_FIELDS -> `[N, ...]` arrays (criteria fields `[N, len(CRITERIA)]`).
    prompts: `N` prompts (None: no prompt).
    pairs: PAIR_FIELDS -> `[P]` arrays; "a"/"b" index `images`.
    pair_prompts: `P` prompts.
    text: `[N, D]` pooled prompt embeddings and `has_text` `[N]`, after `embed_prompts`.
    pair_text, pair_has_text: the same for pairs.
  """
  images: np.ndarray
  rows: dict[str, np.ndarray]
  prompts: list[str | None]
  pairs: dict[str, np.ndarray]
  pair_prompts: list[str | None]
  text: np.ndarray | None = None
  has_text: np.ndarray | None = None
  pair_text: np.ndarray | None = None
  pair_has_text: np.ndarray | None = None

  @property
  def num_rows(self) -> int:
    return len(self.prompts)

  @property
  def num_pairs(self) -> int:
    return len(self.pair_prompts)


class ExamplesBuilder:
  """Accumulates images, rows and pairs from any source, then `build()`s `Examples`."""

  def __init__(self, resolution: int):
    self.resolution = resolution
    self._images: list[np.ndarray] = []
    self._index: dict[str, int] = {}
    self._rows: list[dict[str, Any]] = []
    self._pairs: list[dict[str, Any]] = []

  @property
  def size(self) -> int:
    """Rows plus pairs added so far."""
    return len(self._rows) + len(self._pairs)

  def add_image(self, key: str, load: Callable[[], np.ndarray]) -> int:
    """Index of the image `key`, loading it (uint8 [H, W, 3]) the first time it is seen."""
    if key not in self._index:
      image = pipeline.resize(np.asarray(load(), np.uint8), self.resolution)
      self._index[key] = len(self._images)
      self._images.append(image)
    return self._index[key]

  def add_row(self, image_index: int, prompt: str | None, *, accept: float | None = None,
              score: int | None = None, criteria: dict[str, bool | None] | None = None,
              weight: float = 1.0, eval_label: int = -1) -> None:
    """Adds one labelled row; None labels are masked out."""
    crit = [None if criteria is None else criteria.get(name) for name in CRITERIA]
    self._rows.append({
        "image_index": image_index, "prompt": prompt,
        "accept": 0.0 if accept is None else float(accept), "accept_mask": accept is not None,
        "score_target": 0.0 if score is None else losses.score_target(float(score)),
        "score_mask": score is not None,
        "criteria": [float(bool(c)) for c in crit], "criteria_mask": [c is not None for c in crit],
        "weight": float(weight), "eval_label": int(eval_label)})

  def add_pair(self, a: int, b: int, prompt: str | None, target: float, weight: float) -> None:
    """Adds a preference between images `a` and `b` (target = P(a preferred))."""
    self._pairs.append({"a": a, "b": b, "prompt": prompt, "target": target, "weight": weight})

  def build(self) -> Examples:
    """The accumulated data as arrays."""
    if not self._rows and not self._pairs:
      raise ValueError("no labelled examples: configure a graded source or a ratings file")
    r = self.resolution
    images = np.stack(self._images) if self._images else np.zeros((0, r, r, 3), np.uint8)
    dtypes = {"image_index": np.int32, "eval_label": np.int32, "accept_mask": bool,
              "score_mask": bool, "criteria_mask": bool}
    rows = {k: np.asarray([row[k] for row in self._rows], dtypes.get(k, np.float32))
            for k in ROW_FIELDS}
    rows["criteria"] = rows["criteria"].reshape(-1, len(CRITERIA))
    rows["criteria_mask"] = rows["criteria_mask"].reshape(-1, len(CRITERIA))
    pairs = {k: np.asarray([p[k] for p in self._pairs],
                           np.int32 if k in ("a", "b") else np.float32) for k in PAIR_FIELDS}
    return Examples(images, rows, [row["prompt"] for row in self._rows], pairs,
                    [p["prompt"] for p in self._pairs])


def defect_criteria(defects: Sequence[str] | None) -> dict[str, bool | None]:
  """Image-criterion flags implied by quality defects (all None when defects are unknown)."""
  if defects is None:
    return {name: None for name in DEFECT_CRITERIA}
  return {name: not set(bad) & set(defects) for name, bad in DEFECT_CRITERIA.items()}


def grade_target(quality: str | None, usable_target: float) -> float | None:
  """Accept target of an EyeQ-style grade: good 1, usable `usable_target`, reject 0."""
  if quality is None:
    return None
  return usable_target if quality == "usable" else GRADE_TARGETS[quality]


def prompt_of(labels: labels_lib.FundusLabels, style: int) -> str:
  """The caption of `labels` with the quality grade and defects left out."""
  return captions.caption(dataclasses.replace(labels, quality=None, quality_defects=None), style)


def add_graded(builder: ExamplesBuilder, items: Sequence[tuple[str, np.ndarray, Any]],
               rng: np.random.Generator, *, usable_target: float,
               mismatch_fraction: float) -> None:
  """Adds graded images: accept targets, defect criteria, prompt-match rows.

  Args:
    builder: the table being built.
    items: `(key, uint8 image, FundusLabels)` per image; images without a quality grade are
      skipped.
    rng: prompt styles and mismatch draws.
    usable_target: accept target of a "usable" grade.
    mismatch_fraction: fraction of images that also get a row with another image's prompt
      and only the label prompt_match = False.
  """
  kept = [(k, img, lab) for k, img, lab in items if lab.quality is not None]
  if len(kept) < len(items):
    log.info("skipped %d graded images without a quality grade", len(items) - len(kept))
  prompts = [prompt_of(lab, int(rng.integers(captions.NUM_STYLES))) for _, _, lab in kept]
  for (key, image, lab), prompt in zip(kept, prompts):
    idx = builder.add_image(key, lambda image=image: image)
    crit = dict(defect_criteria(lab.quality_defects), prompt_match=True)
    target = grade_target(lab.quality, usable_target)
    builder.add_row(idx, prompt, accept=target, criteria=crit,
                    eval_label={1.0: 1, 0.0: 0}.get(target, -1))
    other = int(rng.integers(len(kept)))
    if rng.random() < mismatch_fraction and prompts[other] != prompt:
      builder.add_row(idx, prompts[other], criteria={"prompt_match": False})


def phantom_items(num: int, resolution: int, seed: int, quality_mix: Sequence[float]
                  ) -> list[tuple[str, np.ndarray, labels_lib.FundusLabels]]:
  """Renders `num` phantom images with grades drawn from `quality_mix` (good, usable, reject).

  Args:
    num: number of images.
    resolution: side, px.
    seed: first case seed; image i uses case seed `seed + i`.
    quality_mix: probabilities of the three grades.

  Returns:
    `(key, uint8 image, labels)` per image.
  """
  mix = np.asarray(quality_mix, np.float64)
  grades = np.random.default_rng(seed).choice(labels_lib.QUALITIES, num, p=mix / mix.sum())
  out = []
  for i, grade in enumerate(grades):
    sample = phantom.generate(seed + i, resolution, quality=str(grade))
    out.append((f"phantom:{seed + i}", sample.image, sample.labels))
  return out


def source_items(source: Any, crop_fov: bool) -> list[tuple[str, np.ndarray, Any]]:
  """`(key, image, labels)` of every example of a fundax TFDS data source (e.g. EyeQ).

  Args:
    source: a random-access source of raw TFDS examples (`datasets.load_from_config`).
    crop_fov: crop real photographs to the field of view first.
  """
  from fundax.data.builders import features  # pylint: disable=g-import-not-at-top
  out = []
  for i in range(len(source)):
    ex = features.decode_example(source[i])
    image = pipeline.crop_to_fov(ex["image"]) if crop_fov else ex["image"]
    out.append((f"tfds:{ex['id'] or i}", image, ex["labels"]))
  return out


def load_png(path: str, crop_fov: bool) -> np.ndarray:
  """An image file as uint8 RGB [H, W, 3], optionally cropped to the field of view."""
  with Image.open(path) as im:
    image = np.asarray(im.convert("RGB"))
  return pipeline.crop_to_fov(image) if crop_fov else image


def rating_eval_label(r: ratings_lib.Rating) -> int:
  """1 accept / 0 reject / -1 unknown: the accept flag, else score > 3 or < 3."""
  if r.accept is not None:
    return int(r.accept)
  if r.score is None or r.score == 3:
    return -1
  return int(r.score > 3)


def add_ratings(builder: ExamplesBuilder, ratings: Sequence[ratings_lib.Rating],
                pairs: Sequence[ratings_lib.Pair], crop_fov: bool) -> None:
  """Adds human ratings and pairwise preferences (images loaded from their paths).

  Args:
    builder: the table being built.
    ratings: absolute ratings (`ratings.read_ratings`).
    pairs: pairwise preferences.
    crop_fov: crop each image to the field of view first.

  Raises:
    FileNotFoundError: an image is missing; the message names the export line.
  """
  def image(path, line):
    def load():
      try:
        return load_png(path, crop_fov)
      except FileNotFoundError:
        raise FileNotFoundError(f"ratings line {line}: image not found: {path}") from None
    return builder.add_image(path, load)

  for r in ratings:
    builder.add_row(image(r.image_path, r.line), r.prompt,
                    accept=None if r.accept is None else float(r.accept), score=r.score,
                    criteria=r.criteria, weight=r.rater_weight, eval_label=rating_eval_label(r))
  for p in pairs:
    builder.add_pair(image(p.image_a, p.line), image(p.image_b, p.line), p.prompt, p.target,
                     p.rater_weight)


def split_heldout(ratings: Sequence[ratings_lib.Rating], pairs: Sequence[ratings_lib.Pair],
                  fraction: float, seed: int):
  """Splits ratings by image (never the same image on both sides) and pairs by first image.

  Args:
    ratings: all ratings.
    pairs: all pairs: held out when image a is held out, trained on when neither image is.
    fraction: expected fraction of images held out.
    seed: the split's seed.

  Returns:
    `(train_ratings, train_pairs, heldout_ratings, heldout_pairs)`.
  """
  paths = sorted({r.image_path for r in ratings} | {p.image_a for p in pairs})
  rng = np.random.default_rng(seed)
  held = {p for p, u in zip(paths, rng.random(len(paths))) if u < fraction}
  return ([r for r in ratings if r.image_path not in held],
          [p for p in pairs if p.image_a not in held and p.image_b not in held],
          [r for r in ratings if r.image_path in held],
          [p for p in pairs if p.image_a in held])


def embed_prompts(examples: Examples, embed: Callable[[list[str]], np.ndarray] | None,
                  text_dim: int) -> None:
  """Fills `text`/`has_text` (rows and pairs) with pooled embeddings of the unique prompts.

  Args:
    examples: modified in place.
    embed: list of prompts -> float32 `[K, text_dim]`; called once on the unique prompts.
      None: no text conditioning (every row gets `has_text` False).
    text_dim: embedding width (used for rows without a prompt).
  """
  unique = sorted({p for p in examples.prompts + examples.pair_prompts if p is not None})
  if embed is None:
    unique = []
  table = embed(unique) if unique else np.zeros((0, text_dim), np.float32)
  lookup = {p: i for i, p in enumerate(unique)}

  def gather(prompts):
    idx = np.asarray([lookup.get(p, -1) for p in prompts], np.int64)
    text = np.zeros((len(prompts), text_dim), np.float32)
    text[idx >= 0] = table[idx[idx >= 0]]
    return text, idx >= 0

  examples.text, examples.has_text = gather(examples.prompts)
  # Without a prompt there is nothing to match: that label would only teach noise.
  examples.rows["criteria_mask"][:, CRITERIA.index("prompt_match")] &= examples.has_text
  examples.pair_text, examples.pair_has_text = gather(examples.pair_prompts)


def sample_batch(examples: Examples, seed: int | Sequence[int], step: int, batch_size: int,
                 pairs_per_batch: int) -> dict[str, np.ndarray]:
  """The mixed batch of one step: rows first, then (a, b) row pairs.

  Args:
    examples: embedded examples.
    seed: the run's data seed, or several ints (e.g. `[seed, process_index]`).
    step: the optimizer step (the batch is a pure function of seed and step).
    batch_size: rows B (pair images included).
    pairs_per_batch: pairs per batch (2 rows each), when the data has pairs.

  Returns:
    Host arrays `[B, ...]`: "image" float32 [-1, 1], "text", "has_text", the label/mask
    fields of `selector_loss`, "pair_other", "pair_target", "pair_mask".
  """
  rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), step])
  num_pairs = min(pairs_per_batch, batch_size // 2) if examples.num_pairs else 0
  num_rows = batch_size - 2 * num_pairs
  if not examples.num_rows:  # a pairs-only export: every row belongs to a pair
    if batch_size % 2:
      raise ValueError(f"pairs-only data needs an even batch size, got {batch_size}")
    num_pairs, num_rows = batch_size // 2, 0
  rows = rng.choice(examples.num_rows, num_rows, replace=examples.num_rows < num_rows)
  pairs = rng.choice(max(examples.num_pairs, 1), num_pairs,
                     replace=examples.num_pairs < num_pairs)
  r, p = examples.rows, examples.pairs
  image_index = np.concatenate([r["image_index"][rows],
                                np.stack([p["a"][pairs], p["b"][pairs]], 1).ravel()])
  pair_rows = num_rows + 2 * np.arange(num_pairs)
  batch = {
      "image": pipeline.to_float(examples.images[image_index]),
      "text": np.concatenate([examples.text[rows], np.repeat(examples.pair_text[pairs], 2, 0)]),
      "has_text": np.concatenate([examples.has_text[rows],
                                  np.repeat(examples.pair_has_text[pairs], 2)]),
      "pair_other": np.arange(batch_size, dtype=np.int32),
      "pair_target": np.zeros(batch_size, np.float32),
      "pair_mask": np.zeros(batch_size, bool),
  }
  for k in ROW_FIELDS[1:-1]:
    col = r[k][rows]
    batch[k] = np.concatenate([col, np.zeros((2 * num_pairs,) + col.shape[1:], col.dtype)])
  batch["weight"][pair_rows] = p["weight"][pairs]
  batch["pair_other"][pair_rows] = pair_rows + 1
  batch["pair_target"][pair_rows] = p["target"][pairs]
  batch["pair_mask"][pair_rows] = True
  return batch
