"""Training the Selector: `train_selector(config, workdir)`, its pure step and held-out report.

The run: embed the prompts with the frozen text encoder, build the training table and the
held-out tables (`fundax.selector.data`), create or restore the sharded train state
(`fundax.checkpoint`), run `train_step` under one jit in the shared `fundax.train.loop.train_loop`
(progress bar, `metrics.jsonl` + TensorBoard, checkpoints, SIGTERM/Ctrl-C: save and stop,
NaN/inf steps skipped), then score the held-out sets, choose the acceptance threshold
(`fundax.selector.threshold`) and write `selector_eval.json` and the plots. The threshold is
chosen on held-out *ratings* when they have both accepted and rejected images, else on the
held-out graded images.

Batches depend only on (seed, process, step) and the step's randomness is `fold_in(rng, step)`,
so an interrupted run resumes from its last checkpoint without repeating or skipping work. A
preempted run saves at its current step and returns "preempted" without the held-out report.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import optax

from fundax import checkpoint
from fundax import parallel
from fundax.models import selector as selector_lib
from fundax.selector import data as data_lib
from fundax.selector import losses
from fundax.selector import ratings as ratings_lib
from fundax.selector import score as score_lib
from fundax.selector import synthetic
from fundax.selector import text as text_lib
from fundax.selector import threshold as threshold_lib
from fundax.train import guard
from fundax.train import loop
from fundax.train import metric_writers
from fundax.train import optim
from fundax.train import state as state_lib

log = logging.getLogger(__name__)


def train_step(state: state_lib.TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model: selector_lib.Selector, optimizer: Any,
               loss_weights: dict[str, float]) -> tuple[state_lib.TrainState, dict]:
  """One optimizer step on a mixed batch (pure; `parallel.jit_step` shards it).

  Args:
    state: the train state.
    batch: a `data.sample_batch` batch as arrays.
    rng: the run's training key (unused by this deterministic model, kept for the
      `jit_step` signature; dropout or augmentation would draw from `fold_in(rng, step)`).
    model: the Selector.
    optimizer: the optax transformation of the state.
    loss_weights: multiplier of each loss term.

  Returns:
    `(new state, metrics)`; a NaN/inf loss or gradient leaves the params and optimizer state
    as they were and reports `nonfinite = 1` (`fundax.train.guard`).
  """
  del rng

  def loss_fn(params):
    out = model.apply({"params": params}, batch["image"], batch["text"], batch["has_text"])
    return losses.selector_loss(out, batch, loss_weights)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics["grad_norm"] = optax.global_norm(grads)  # logged to catch divergence early
  new_state = state_lib.apply_gradients(state, grads, optimizer)
  new_state, metrics["nonfinite"] = guard.keep_finite(state, new_state,
                                                      guard.all_finite(loss, grads))
  return new_state, metrics


def _builder_examples(builder: data_lib.ExamplesBuilder) -> data_lib.Examples | None:
  return builder.build() if builder.size else None


def load_data(config: Any, workdir: str) -> dict[str, data_lib.Examples | None]:
  """The training table and the held-out tables ("graded", "ratings"; None when absent).

  Args:
    config: the job config.
    workdir: where a synthetic ratings export is written when the config asks for one.

  Returns:
    {"train": Examples, "graded": Examples | None, "ratings": Examples | None}, not embedded.
  """
  res, g, r = config.resolution, config.graded, config.ratings
  train, graded, rated = (data_lib.ExamplesBuilder(res) for _ in range(3))
  rng = np.random.default_rng([config.seed, 1])
  graded_kw = {"usable_target": g.usable_target, "mismatch_fraction": g.mismatch_fraction}
  if g.source == "phantom":
    data_lib.add_graded(train, data_lib.phantom_items(g.num_train, res, g.seed, g.quality_mix),
                        rng, **graded_kw)
    data_lib.add_graded(graded, data_lib.phantom_items(
        g.num_heldout, res, g.seed + g.num_train, g.quality_mix), rng, **graded_kw)
  elif g.source == "tfds":
    from fundax.data import datasets  # pylint: disable=g-import-not-at-top
    for builder, split in ((train, "train"), (graded, g.heldout_split)):
      if g.max_examples:
        split = f"{split}[:{g.max_examples}]"
      source = datasets.load_from_config(config.data, split)
      data_lib.add_graded(builder, data_lib.source_items(source, g.crop_fov), rng, **graded_kw)
  elif g.source != "none":
    raise ValueError(f"graded.source must be 'phantom', 'tfds' or 'none', got {g.source!r}")

  path = r.train_path
  if not path and r.num_synthetic:
    path = synthetic.write_synthetic_ratings(os.path.join(workdir, "synthetic_ratings"),
                                             r.num_synthetic, res, r.synthetic_seed)
  if path:
    ratings, pairs = ratings_lib.read_ratings(path, check_files=True)
    if r.heldout_path:
      held_ratings, held_pairs = ratings_lib.read_ratings(r.heldout_path, check_files=True)
    else:
      ratings, pairs, held_ratings, held_pairs = data_lib.split_heldout(
          ratings, pairs, r.heldout_fraction, config.seed)
    data_lib.add_ratings(train, ratings, pairs, r.crop_fov)
    data_lib.add_ratings(rated, held_ratings, held_pairs, r.crop_fov)
  return {"train": train.build(), "graded": _builder_examples(graded),
          "ratings": _builder_examples(rated)}


def _finite(x: Any) -> Any:
  """NaN/inf -> None, recursively, so the report is strict JSON."""
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def evaluate_heldout(predict: score_lib.Predict, params: Any, examples: data_lib.Examples,
                     target_precision: float, num_bins: int) -> dict[str, Any] | None:
  """Accept metrics, per-criterion AUROC and pairwise accuracy on one held-out table.

  Returns:
    `threshold.evaluate(...)` plus "criteria_auroc" and "pair_accuracy" ("num_pairs"), or
    None when the table has no binary accept label.
  """
  rows = examples.rows
  out = predict(params, examples.images[rows["image_index"]], examples.text, examples.has_text)
  labelled = rows["eval_label"] >= 0
  if not labelled.any():
    return None
  report = threshold_lib.evaluate(out["score"][labelled], rows["eval_label"][labelled],
                                  target_precision, num_bins)
  report["criteria_auroc"] = {}
  for j, name in enumerate(selector_lib.CRITERIA):
    m = rows["criteria_mask"][:, j]
    if m.any():
      report["criteria_auroc"][name] = threshold_lib.roc_auc(out["criteria"][m, j],
                                                             rows["criteria"][m, j])
  decided = examples.pairs["target"] != 0.5
  if decided.any():
    p = examples.pairs
    la = predict(params, examples.images[p["a"]], examples.pair_text, examples.pair_has_text)
    lb = predict(params, examples.images[p["b"]], examples.pair_text, examples.pair_has_text)
    right = (la["logit"] > lb["logit"]) == (p["target"] == 1.0)
    report["pair_accuracy"] = float(right[decided].mean())
    report["num_pairs"] = int(decided.sum())
  return report


def _write_report(reports: dict[str, Any], config: Any, workdir: str, step: int) -> dict:
  """Chooses the threshold source, writes plots and `selector_eval.json`; returns the report."""
  usable = {k: v for k, v in reports.items() if v is not None}
  if not usable:
    raise ValueError("no held-out examples with accept labels: cannot choose a threshold")
  both = [k for k, v in usable.items() if 0 < v["num_positive"] < v["num"]]
  source = next((k for k in ("ratings", "graded") if k in both), next(iter(usable)))
  plots = []
  for name, rep in usable.items():
    plots += threshold_lib.plot_report(rep, os.path.join(workdir, "plots"), prefix=f"{name}_")
    del rep["curves"]  # the plots show them; the JSON stays small
  report = _finite({"step": step, "threshold_source": source,
                    "target_precision": config.target_precision,
                    "threshold": usable[source]["threshold"], "heldout": usable,
                    "plots": plots})
  with open(os.path.join(workdir, score_lib.EVAL_FILE), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  return report


def train_batches(examples: data_lib.Examples, config: Any, start: int, mesh: jax.sharding.Mesh
                  ) -> Iterator[dict[str, jax.Array]]:
  """The global batches of steps start + 1, start + 2, ... (`data.sample_batch` of each step).

  Each process draws its own rows, a function of (seed, process, step) only, so a run resumed
  at `start` gets the batches an uninterrupted run gets.
  """
  local_batch = config.batch_size // jax.process_count()
  for step in itertools.count(start):
    batch = data_lib.sample_batch(examples, [config.seed, jax.process_index()], step,
                                  local_batch, config.pairs_per_batch)
    yield parallel.host_local_to_global(batch, mesh)


def train_selector(config: Any, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains the Selector, evaluates it on held-out data and writes everything to `workdir`.

  Args:
    config: from configs/selector.py.
    workdir: output directory; an existing run there is resumed.

  Returns:
    {"workdir", "checkpoints", "metrics", "eval_report" (path), "report" (dict)} for the CLI;
    a run stopped by SIGTERM or Ctrl-C (saved at its step) returns the first three with
    "unfinished" and "preempted" instead of the report.

  Raises:
    loop.NonFiniteLossError: `max_nonfinite_steps` NaN/inf steps in a row.
  """
  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh(config.mesh.to_dict())
  divisor = parallel.batch_size_divisor(mesh)
  if config.batch_size % divisor:
    raise ValueError(f"batch_size {config.batch_size} is not a multiple of {divisor} devices")

  embed, text_dim = text_lib.make_prompt_embedder(config.text_encoder, config.max_length)
  text_dim = text_dim or 1  # no text encoder: the model still keeps a (null) text input
  data = load_data(config, workdir)
  for examples in data.values():
    if examples is not None:
      data_lib.embed_prompts(examples, embed, text_dim)
  model_config = {**config.model.to_dict(), "text_dim": text_dim}
  meta = {"job": config.to_dict(), "model": model_config,
          "text_encoder": {"spec": config.text_encoder, "max_length": config.max_length,
                           "dim": text_dim}}
  model = score_lib.make_model(meta)
  optimizer = optim.make_optimizer(config.optim)

  rng_init, rng_train = jax.random.split(jax.random.key(config.seed))

  def init_state(rng):
    return state_lib.create(selector_lib.init_params(model, rng, config.resolution), optimizer)

  abstract = parallel.abstract_sharded(init_state, rng_init, mesh)
  manager = checkpoint.make_manager(workdir, max_to_keep=config.keep_checkpoints)
  state, _, source = checkpoint.restore_or_init(
      manager, abstract, lambda: parallel.init_sharded(init_state, rng_init, mesh))
  step_fn = parallel.jit_step(
      functools.partial(train_step, model=model, optimizer=optimizer,
                        loss_weights=config.loss_weights.to_dict()),
      jax.tree.map(lambda x: x.sharding, abstract), parallel.batch_sharding(mesh))

  start = int(state.step)
  log.info("Selector: %d training rows, %d pairs; starting at step %d (%s)",
           data["train"].num_rows, data["train"].num_pairs, start, source)

  def save(step, state):
    checkpoint.save(manager, step, state, config=meta, extras={})

  writer = metric_writers.MetricWriter(workdir, resume_step=start)
  try:
    result = loop.train_loop(
        state, step_fn=step_fn, batches=train_batches(data["train"], config, start, mesh),
        batch_keys=None, rng=rng_train, num_steps=config.num_steps, writer=writer,
        log_every=config.log_every, checkpoint_every=config.checkpoint_every, save=save,
        # A Selector retrained in RLHF takes the job config of its checkpoint, which may
        # predate the field.
        max_nonfinite=config.get("max_nonfinite_steps", 10), desc="selector")
  finally:
    checkpoint.wait(manager)
    manager.close()
    writer.close()
  state = result.state
  out = {"workdir": workdir, "checkpoints": checkpoint.checkpoint_dir(workdir),
         "metrics": str(writer.jsonl_path), **loop.status(result, config.num_steps)}
  if result.preempted:
    return out

  predict = score_lib.make_predict(model, mesh, config.eval_batch_size)
  reports = {name: evaluate_heldout(predict, state.params, data[name], config.target_precision,
                                    config.calibration_bins) if data[name] else None
             for name in ("graded", "ratings")}
  report = _write_report(reports, config, workdir, int(state.step))
  t = report["threshold"]
  log.info("Selector threshold %.4f (%s): precision %.3f, recall %.3f", t["threshold"],
           report["threshold_source"], t["precision"], t["recall"])
  return {**out, "eval_report": os.path.join(workdir, score_lib.EVAL_FILE), "report": report}
