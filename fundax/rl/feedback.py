"""Between rounds: candidates to the rating store, simulated raters, and a retrained Selector.

`push_candidates` writes a round's candidates as a feedback run (PNG images and
`candidates.jsonl`, `fundax.feedback.importer`'s format) and imports it into the rating
database, where people can rate them in the web app (`fundax feedback serve`). For runs without
people, simulated raters (`fundax.feedback.simulate`) rate every candidate with a known truth.
Generated images have no phantom ground truth, so the run attaches a stand-in truth
(`stand_in_labels`): the facts the prompt states, except that the laterality is the side where
an optic-disc detector finds the disc (so a disc on the wrong side reads as a prompt mismatch),
and an image-quality grade from measured exposure, sharpness and field of view
(`quality_defects`; thresholds set on phantom images at 64 px). This stand-in uses no network,
so it shares nothing with the Selector or the independent evaluator. `retrain_selector` then
exports the ratings and trains a new Selector version on them (its own job config, with the
export as its ratings and a shorter schedule).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from PIL import Image
from scipy import ndimage

from fundax import checkpoint
from fundax import images as images_lib
from fundax.data import caption_parser
from fundax.eval import anatomy_checks
from fundax.feedback import export
from fundax.feedback import importer
from fundax.feedback import simulate
from fundax.selector import train as selector_train

log = logging.getLogger(__name__)

# Stand-in quality measures (luminance in [0, 1] inside the field of view).
DARK, BRIGHT = 0.25, 0.6  # mean FOV luminance outside [DARK, BRIGHT]: under/overexposed
BLUR = 0.05  # mean |Laplacian| of the FOV luminance below this: defocused
FOV_RANGE = (0.3, 0.9)  # fraction of the image inside the field of view; outside: off-centre


def quality_defects(image) -> tuple[str, ...]:
  """Quality defects measured on an image (float in [-1, 1] or uint8), for the stand-in truth."""
  image = np.asarray(image)
  unit = image / 255.0 if image.dtype == np.uint8 else (image.astype(np.float64) + 1.0) / 2.0
  fov = anatomy_checks.fov_mask(image)
  lum = unit.mean(-1)
  defects = []
  fraction = float(fov.mean())
  if not FOV_RANGE[0] <= fraction <= FOV_RANGE[1]:
    defects.append("off_centre")
  inside = lum[fov] if fov.any() else lum.ravel()
  mean = float(inside.mean())
  if mean < DARK:
    defects.append("underexposure")
  elif mean > BRIGHT:
    defects.append("overexposure")
  sharpness = float(np.abs(ndimage.laplace(lum))[fov].mean()) if fov.any() else 0.0
  if sharpness < BLUR:
    defects.append("defocus")
  return tuple(defects)


def stand_in_labels(image, prompt: str) -> dict[str, Any]:
  """The stand-in truth of a generated candidate as a FundusLabels dict (module docstring)."""
  stated = caption_parser.parse_caption(prompt)
  defects = quality_defects(image)
  quality = ("good", "usable")[len(defects)] if len(defects) < 2 else "reject"
  laterality = stated.laterality
  if laterality is not None:
    # The eye the image shows: the disc's side, or for a disc-centred photograph the side
    # opposite the fovea (None when the detectors find neither).
    laterality = (anatomy_checks.disc_side(image) if stated.field != "disc" else
                  {"left": "right", "right": "left"}.get(anatomy_checks.fovea_side(image)))
  labels = dataclasses.replace(stated, laterality=laterality, quality=quality,
                               quality_defects=defects)
  return labels.to_dict()


def push_candidates(run_dir: str | pathlib.Path, db: str, images, prompts: Sequence[str], *,
                    seeds: Sequence[int], model_step: int, media: str | pathlib.Path,
                    simulated: bool, rater_seed: int) -> dict[str, int]:
  """Writes candidates as a feedback run, imports them, and (optionally) simulates ratings.

  Args:
    run_dir: the run directory to write (under `media`).
    db: the rating database (SQLite path or URL).
    images: [N, H, W, 3] float candidates in [-1, 1].
    prompts: N prompts.
    seeds: N sampling seeds (recorded in the manifest).
    model_step: the generator's update count.
    media: the database's media root.
    simulated: attach the stand-in truth and let the simulated raters rate.
    rater_seed: the simulated raters' seed (fixed per run: re-rating changes nothing).

  Returns:
    {"candidates": new candidates, "ratings": new ratings, "pairs": new pairs}.
  """
  run_dir = pathlib.Path(run_dir)
  (run_dir / "images").mkdir(parents=True, exist_ok=True)
  pixels = images_lib.to_uint8(images)
  lines = []
  for i, (image, prompt) in enumerate(zip(pixels, prompts)):
    name = f"images/c{i:04d}.png"
    Image.fromarray(image).save(run_dir / name)
    line = {"image": name, "prompt": prompt, "seed": int(seeds[i]), "model_step": model_step}
    if simulated:
      line["labels"] = stand_in_labels(image, prompt)
    lines.append(line)
  with open(run_dir / importer.MANIFEST, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)
  counts = {"candidates": importer.import_run(run_dir, db, media=media), "ratings": 0,
            "pairs": 0}
  if simulated:
    counts.update(simulate.simulate(db, seed=rater_seed))
  return counts


def selector_retrain_config(selector_dir: str, ratings_path: str,
                            overrides: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The Selector's own job config with the exported ratings and the loop's overrides.

  Args:
    selector_dir: the current Selector's workdir (its checkpoint holds its job config).
    ratings_path: the exported ratings (JSONL).
    overrides: `config.feedback.selector` of configs/rlhf.py (num_steps, graded sizes).

  Returns:
    The config for `train_selector`.
  """
  job = copy.deepcopy(checkpoint.load_config(selector_dir)["job"])
  config = ml_collections.ConfigDict(job)
  config.ratings.train_path = str(ratings_path)
  config.ratings.num_synthetic = 0
  config.num_steps = overrides.num_steps
  config.optim.total_steps = overrides.num_steps
  config.optim.warmup_steps = min(config.optim.warmup_steps, overrides.num_steps - 1)
  config.checkpoint_every = overrides.num_steps
  config.log_every = min(config.log_every, overrides.num_steps)
  config.graded.num_train = overrides.graded_train
  config.graded.num_heldout = overrides.graded_heldout
  return config


def retrain_selector(db: str, selector_dir: str, out_dir: str | pathlib.Path,
                     overrides: ml_collections.ConfigDict) -> dict[str, Any]:
  """Exports the ratings and trains the next Selector version in `out_dir`.

  Returns:
    {"workdir", "ratings": export path, "lines", "threshold"}.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  ratings_path = out_dir / "ratings.jsonl"
  lines = export.export_jsonl(db, ratings_path)
  config = selector_retrain_config(selector_dir, str(ratings_path), overrides)
  result = selector_train.train_selector(config, str(out_dir))
  log.info("retrained the Selector on %d rating lines: %s", lines, out_dir)
  return {"workdir": result["workdir"], "ratings": str(ratings_path), "lines": lines,
          "threshold": result["report"]["threshold"]["threshold"]}
