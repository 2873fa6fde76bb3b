"""Registering generated candidates for rating: the run manifest and its importer.

A run directory (written by the RLHF loop, a sampling job, or `write_phantom_run` for demos)
holds the candidate images and a manifest, `candidates.jsonl`, with one JSON object per line:

    {"image": "images/p003_c01.png",   # PNG, relative to the run directory (required)
     "prompt": "OS, disc-centred. Moderate NPDR ...",   # the text it was generated from (required)
     "seed": 1234,                     # sampling seed (int or null)
     "model_step": 5000,               # generator training step (int or null)
     "labels": {...}}                  # optional FundusLabels dict: the ground truth, known only
                                       # for phantom images; simulated raters need it

`import_run(run_dir, store)` registers every line as a candidate of run `run_dir.name` with its
image path stored relative to the database's media root (the directory the web app serves images
from; fixed by the first import, by default the run directory's parent). Importing the same run
again adds only the new lines, so the RLHF loop can append to the manifest and re-import.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import numpy as np
from PIL import Image

from fundax.data import captions
from fundax.data import labels as labels_lib
from fundax.data import phantom
from fundax.feedback import store as store_lib

MANIFEST = "candidates.jsonl"
MEDIA_ROOT_KEY = "media_root"
# The clinical facts a phantom candidate is generated to match: everything a prompt states
# except image quality, which is left to vary so that raters have something to judge.
PROMPT_FACTS = ("laterality", "field", "pigmentation", "dr_grade", "dme", "cdr", "glaucoma",
                "amd_stage", "hypertensive_grade")
_log = logging.getLogger(__name__)


def media_root(store: store_lib.Store) -> pathlib.Path | None:
  """The directory candidate paths are relative to (None before the first import)."""
  root = store.get_meta(MEDIA_ROOT_KEY)
  return pathlib.Path(root) if root else None


def read_manifest(run_dir: str | pathlib.Path) -> list[dict]:
  """Parses and checks a run's `candidates.jsonl`.

  Args:
    run_dir: the run directory.

  Returns:
    One dict per line with keys image (absolute Path), prompt, seed, model_step, labels (JSON
    string or None).

  Raises:
    ValueError: naming the line, for bad JSON, a missing field, or a missing or undecodable
      image.
  """
  run_dir = pathlib.Path(run_dir)
  path = run_dir / MANIFEST
  if not path.is_file():
    raise ValueError(f"{run_dir} has no {MANIFEST}")
  entries = []
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      d = json.loads(line)
    except json.JSONDecodeError as err:
      raise ValueError(f"{path}:{n}: not JSON ({err})") from None
    if not isinstance(d, dict) or not isinstance(d.get("image"), str) or not isinstance(
        d.get("prompt"), str) or not d["prompt"].strip():
      raise ValueError(f"{path}:{n}: needs string fields 'image' and 'prompt'")
    for k in ("seed", "model_step"):
      if d.get(k) is not None and (not isinstance(d[k], int) or isinstance(d[k], bool)):
        raise ValueError(f"{path}:{n}: {k} must be an integer or null")
    image = (run_dir / d["image"]).resolve()
    if not image.is_relative_to(run_dir.resolve()) or not image.is_file():
      raise ValueError(f"{path}:{n}: image {d['image']!r} is not a file inside {run_dir}")
    if image.suffix.lower() != ".png":
      raise ValueError(f"{path}:{n}: image {d['image']!r} is not a PNG")
    try:
      with Image.open(image) as im:
        im.load()  # the web app serves it later: an undecodable file fails here, named
    except (OSError, ValueError, Image.DecompressionBombError) as err:
      raise ValueError(f"{path}:{n}: image {d['image']!r} cannot be decoded ({err})") from None
    labels = d.get("labels")
    if labels is not None:
      labels = labels_lib.FundusLabels.from_dict(labels).to_json()  # validates
    entries.append({"image": image, "prompt": d["prompt"], "seed": d.get("seed"),
                    "model_step": d.get("model_step"), "labels": labels})
  return entries


def import_run(run_dir: str | pathlib.Path, store: store_lib.DB, *,
               media: str | pathlib.Path | None = None, run_id: str | None = None) -> int:
  """Registers a run's candidates in the rating database (idempotent).

  Args:
    run_dir: directory holding `candidates.jsonl` and the images.
    store: a Store or a database path / URL.
    media: media root for a new database (default: the parent of `run_dir`); must agree with
      the database's root once one is set.
    run_id: the run's name in the database (default: the directory name).

  Returns:
    How many candidates were new.

  Raises:
    ValueError: a bad manifest, or images outside the database's media root.
  """
  store = store_lib.as_store(store)
  run_dir = pathlib.Path(run_dir).resolve()
  entries = read_manifest(run_dir)
  wanted = pathlib.Path(media or run_dir.parent).resolve()
  root = pathlib.Path(store.set_meta_once(MEDIA_ROOT_KEY, str(wanted)))
  if media is not None and root != wanted:
    raise ValueError(f"this database serves images from {root}, not {wanted}")
  run_id = run_id or run_dir.name
  rows = []
  for e in entries:
    if not e["image"].is_relative_to(root):
      raise ValueError(f"{e['image']} is outside the media root {root}; import runs that live "
                       f"under it (or start a new database)")
    rows.append({"run_id": run_id, "path": e["image"].relative_to(root).as_posix(),
                 "prompt": e["prompt"], "seed": e["seed"], "model_step": e["model_step"],
                 "labels": e["labels"]})
  new = store.add_candidates(rows)
  _log.info("imported %d new of %d candidates from %s", new, len(rows), run_dir)
  return new


def write_phantom_run(run_dir: str | pathlib.Path, *, num_prompts: int = 4, per_prompt: int = 4,
                      resolution: int = 128, seed: int = 0, off_prompt_rate: float = 0.25,
                      model_step: int = 0) -> pathlib.Path:
  """Writes a demo run: phantom images as candidates of generated prompts, with their truth.

  Each prompt is the caption of a sampled phantom case (quality unstated). Its candidates are
  phantom images constrained to the prompt's clinical facts, with free image quality, except
  that a fraction are drawn unconstrained, standing in for a generator that ignored the prompt.

  Args:
    run_dir: output directory (created).
    num_prompts: how many prompts.
    per_prompt: candidates per prompt.
    resolution: image size in pixels.
    seed: makes the run reproducible.
    off_prompt_rate: probability that a candidate ignores its prompt.
    model_step: written into the manifest.

  Returns:
    The run directory.
  """
  run_dir = pathlib.Path(run_dir)
  (run_dir / "images").mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng([seed, 0])
  lines = []
  for p in range(num_prompts):
    target = phantom.sample_case(np.random.default_rng([seed, 1, p])).labels()
    facts = {k: getattr(target, k) for k in PROMPT_FACTS}
    prompt = captions.caption(dataclasses.replace(target, quality=None, quality_defects=None),
                              style=p % 4)
    for c in range(per_prompt):
      sample_seed = int(rng.integers(2**31))
      constraints = {} if rng.random() < off_prompt_rate else facts
      sample = phantom.generate(seed=sample_seed, resolution=resolution, **constraints)
      name = f"images/p{p:03d}_c{c:02d}.png"
      Image.fromarray(sample.image).save(run_dir / name)
      lines.append({"image": name, "prompt": prompt, "seed": sample_seed,
                    "model_step": model_step, "labels": sample.labels.to_dict()})
  with open(run_dir / MANIFEST, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)
  return run_dir
