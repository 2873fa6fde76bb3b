"""Scoring images with a trained Selector: the jitted predictor, loading a run, `score_images`.

A Selector run's workdir is enough to score: `checkpoints/` holds the params with the job
config, the model config and the text-encoder spec (JSON), and `selector_eval.json` holds the
learned acceptance threshold. The same `make_predict` serves held-out evaluation during
training and scoring here, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from fundax import checkpoint
from fundax import parallel
from fundax.data import pipeline
from fundax.interop import params_io
from fundax.models import selector as selector_lib
from fundax.selector import text as text_lib

log = logging.getLogger(__name__)

EVAL_FILE = "selector_eval.json"
DEFAULT_THRESHOLD = 0.5  # used, with a warning, when a run has no evaluation report

Predict = Callable[[Any, np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]


def make_predict(model: selector_lib.Selector, mesh: jax.sharding.Mesh,
                 batch_size: int) -> Predict:
  """A host function scoring any number of images in fixed-size, batch-sharded chunks.

  Args:
    model: the Selector.
    mesh: device mesh; each chunk is sharded over its batch axes.
    batch_size: rows per compiled call (a multiple of the mesh's batch size divisor); the last
      chunk is padded, so there is one compilation.

  Returns:
    `predict(params, images uint8 [K, R, R, 3], text [K, D], has_text [K])` ->
    {"score": [K] sigmoid of the overall logit, "logit": [K], "criteria": [K, C]
    probabilities}, as numpy.
  """
  divisor = parallel.batch_size_divisor(mesh)
  if batch_size % divisor:
    raise ValueError(f"eval batch size {batch_size} is not a multiple of {divisor} devices")
  sharding = parallel.batch_sharding(mesh)

  @jax.jit
  def step(params, image, text, has_text):
    out = model.apply({"params": params}, image, text, has_text)
    return {"score": jax.nn.sigmoid(out["logit"]), "logit": out["logit"],
            "criteria": jax.nn.sigmoid(out["criteria"])}

  def predict(params, images, text, has_text):
    outs = []
    for start in range(0, len(images), batch_size):
      n = min(batch_size, len(images) - start)

      def pad(x, start=start, n=n):
        return np.concatenate([x[start:start + n],
                               np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])

      chunk = (pipeline.to_float(pad(images)), pad(text).astype(np.float32), pad(has_text))
      chunk = jax.device_put(chunk, sharding)
      outs.append(jax.tree.map(lambda x: np.asarray(x)[:n], step(params, *chunk)))
    if not outs:
      c = len(selector_lib.CRITERIA)
      return {"score": np.zeros(0), "logit": np.zeros(0), "criteria": np.zeros((0, c))}
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  return predict


def make_model(meta: dict[str, Any]) -> selector_lib.Selector:
  """The Selector a checkpoint's config describes.

  Args:
    meta: the checkpoint's config JSON ("model": architecture, "job": dtypes).

  Returns:
    The module.
  """
  job = meta["job"]["model"]
  return selector_lib.make_selector(meta["model"], dtype=jnp.dtype(job["dtype"]),
                                    param_dtype=jnp.dtype(job["param_dtype"]))


def load_selector(workdir: str | os.PathLike, mesh: jax.sharding.Mesh | None = None
                  ) -> tuple[selector_lib.Selector, Any, dict[str, Any], float]:
  """Restores the latest intact checkpoint of a Selector run (`fundax.checkpoint`'s reader).

  Args:
    workdir: the run's workdir (holding `checkpoints/` and `selector_eval.json`).
    mesh: where to place the params (replicated); None: all local devices on a "data" axis.

  Returns:
    `(model, params, meta, threshold)`: meta is the JSON saved with the checkpoint ("job",
    "model", "text_encoder"); threshold comes from the evaluation report.

  Raises:
    FileNotFoundError, checkpoint.CheckpointError: naming the directory or the damaged steps.
    ValueError: the checkpoint is not a Selector run's, or its params do not fit its model.
  """
  workdir = os.path.abspath(os.fspath(workdir))
  mesh = parallel.make_mesh({"data": -1}) if mesh is None else mesh
  restored = checkpoint.restore_params(workdir, fields=("params",))
  meta, params = restored["config"], restored["state"]["params"]
  missing = [k for k in ("job", "model", "text_encoder") if k not in meta]
  if missing or params is None:
    raise ValueError(f"{restored['step_dir']} is not a Selector checkpoint (its config lacks "
                     f"{missing or 'nothing, but it holds no params'}): give the workdir of "
                     "`fundax train selector`")
  model = make_model(meta)
  expected = jax.eval_shape(lambda rng: selector_lib.init_params(
      model, rng, meta["job"]["resolution"]), jax.random.key(0))
  params_io.check_params_match(expected, params, what=f"params in {restored['step_dir']}")
  params = jax.device_put(params, parallel.replicated(mesh))
  report_path = os.path.join(workdir, EVAL_FILE)
  if os.path.isfile(report_path):
    with open(report_path, encoding="utf-8") as f:
      threshold = float(json.load(f)["threshold"]["threshold"])
  else:
    log.warning("no %s in %s: using the default threshold %.2f", EVAL_FILE, workdir,
                DEFAULT_THRESHOLD)
    threshold = DEFAULT_THRESHOLD
  return model, params, meta, threshold


def read_image(path: str | os.PathLike) -> np.ndarray:
  """An image file as uint8 RGB [H, W, 3].

  Raises:
    FileNotFoundError, ValueError: naming the file when it is missing, empty, not an image or
      truncated.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image not found (or not a file): {path}")
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from e


def score_images(checkpoint_dir: str | os.PathLike, image_paths: Sequence[str],
                 prompts: Sequence[str | None] | None = None, *,
                 threshold: float | None = None) -> list[dict[str, Any]]:
  """Scores image files with a trained Selector (`fundax score --checkpoint DIR IMAGES...`).

  Args:
    checkpoint_dir: a Selector workdir written by `train_selector`.
    image_paths: image files (PNG/JPEG); resized to the Selector's resolution, and cropped to
      the field of view when the run's `ratings.crop_fov` says so.
    prompts: one prompt per image (None entries: no prompt), or None for no prompts.
    threshold: overrides the learned threshold.

  Returns:
    One dict per image, in order: {"path", "score" (in [0, 1]), "accepted" (score >=
    threshold), "threshold", "criteria": {name: probability; prompt_match None without a
    prompt}}.
  """
  if prompts is not None and len(prompts) != len(image_paths):
    raise ValueError(f"got {len(prompts)} prompts for {len(image_paths)} images")
  if not image_paths:
    return []
  if threshold is not None and not math.isfinite(threshold):
    raise ValueError(f"threshold must be a finite number, got {threshold}")
  raw = [read_image(p) for p in image_paths]  # a bad file fails before the model loads
  model, params, meta, learned = load_selector(checkpoint_dir)
  threshold = learned if threshold is None else float(threshold)
  job = meta["job"]
  crop = pipeline.crop_to_fov if job["ratings"]["crop_fov"] else (lambda image: image)
  images = np.stack([pipeline.resize(crop(image), job["resolution"]) for image in raw])
  prompts = [None] * len(image_paths) if prompts is None else list(prompts)
  enc = meta["text_encoder"]
  text = np.zeros((len(prompts), model.text_dim), np.float32)
  has_text = np.asarray([p is not None for p in prompts], bool)
  if has_text.any() and enc["spec"] != text_lib.NO_TEXT:
    embed, _ = text_lib.make_prompt_embedder(enc["spec"], enc["max_length"])
    text[has_text] = embed([p for p in prompts if p is not None])
  else:
    has_text[:] = False
  mesh = parallel.make_mesh({"data": -1})
  divisor = parallel.batch_size_divisor(mesh)
  batch = divisor * -(-min(len(images), 64) // divisor)  # <= 64 rows, a multiple of devices
  out = make_predict(model, mesh, batch)(params, images, text, has_text)
  results = []
  for i, path in enumerate(image_paths):
    crit = {name: float(out["criteria"][i, j]) for j, name in enumerate(selector_lib.CRITERIA)}
    if not has_text[i]:
      crit["prompt_match"] = None
    score = float(out["score"][i])
    results.append({"path": os.fspath(path), "score": score, "accepted": score >= threshold,
                    "threshold": threshold, "criteria": crit})
  return results
