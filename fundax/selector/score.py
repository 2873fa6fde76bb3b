"""Scoring images with a trained Selector: the jitted predictor, loading a run, `score_images`.

A Selector run's workdir is enough to score: `checkpoints/` holds the params with the job
config, the model config and the text-encoder spec (JSON), and `selector_eval.json` holds the
learned acceptance threshold. The same `make_predict` serves held-out evaluation during
training and scoring here, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fundax import checkpoint
from fundax import parallel
from fundax.data import pipeline
from fundax.models import selector as selector_lib
from fundax.selector import data as data_lib
from fundax.selector import text as text_lib
from fundax.train import optim
from fundax.train import state as state_lib

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


def abstract_state(model: selector_lib.Selector, optim_config: Any, resolution: int,
                   mesh: jax.sharding.Mesh) -> Any:
  """Shapes, dtypes and shardings of the Selector's train state (the restore target).

  Args:
    model: the Selector.
    optim_config: the optimizer config (the optimizer state's structure depends on it).
    resolution: image side, px.
    mesh: the device mesh.

  Returns:
    A pytree of sharded `jax.ShapeDtypeStruct`s.
  """
  optimizer = optim.make_optimizer(optim_config)

  def init(rng):
    return state_lib.create(selector_lib.init_params(model, rng, resolution), optimizer)

  return parallel.abstract_sharded(init, jax.random.key(0), mesh)


def load_selector(workdir: str | os.PathLike, mesh: jax.sharding.Mesh | None = None
                  ) -> tuple[selector_lib.Selector, Any, dict[str, Any], float]:
  """Restores the latest checkpoint of a Selector run.

  Args:
    workdir: the run's workdir (holding `checkpoints/` and `selector_eval.json`).
    mesh: where to place the params; None: all local devices on a "data" axis.

  Returns:
    `(model, params, meta, threshold)`: meta is the JSON saved with the checkpoint ("job",
    "model", "text_encoder"); threshold comes from the evaluation report.

  Raises:
    FileNotFoundError, checkpoint.CheckpointError: naming the directory.
  """
  workdir = os.path.abspath(os.fspath(workdir))
  mesh = parallel.make_mesh({"data": -1}) if mesh is None else mesh
  meta = checkpoint.load_config(workdir)
  model = make_model(meta)
  target = abstract_state(model, meta["job"]["optim"], meta["job"]["resolution"], mesh)
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir), options=options,
                             item_names=checkpoint.ITEMS) as manager:
    if manager.latest_step() is None:
      raise checkpoint.CheckpointError(f"no Selector checkpoint in {manager.directory}")
    state, _, _ = checkpoint.restore_or_init(manager, target, init_fn=None)
  report_path = os.path.join(workdir, EVAL_FILE)
  if os.path.isfile(report_path):
    with open(report_path, encoding="utf-8") as f:
      threshold = float(json.load(f)["threshold"]["threshold"])
  else:
    log.warning("no %s in %s: using the default threshold %.2f", EVAL_FILE, workdir,
                DEFAULT_THRESHOLD)
    threshold = DEFAULT_THRESHOLD
  return model, state.params, meta, threshold


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
  model, params, meta, learned = load_selector(checkpoint_dir)
  threshold = learned if threshold is None else float(threshold)
  job = meta["job"]
  images = np.stack([pipeline.resize(data_lib.load_png(os.fspath(p), job["ratings"]["crop_fov"]),
                                     job["resolution"]) for p in image_paths])
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
