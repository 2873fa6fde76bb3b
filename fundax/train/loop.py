"""Loop helpers shared by the trainers: data setup, the step loop, evaluation, grids.

This module owns what every `fundax.trainers.*.run` does around its pure step function:
building the dataset a config names, making train/eval batch iterators, and `train_loop`,
which runs the jitted step from the state's step to `num_steps` with a progress bar, records
metrics, calls periodic hooks (evaluation, sample grids) and saves checkpoints whose extras
carry the data-iterator position, so that a rerun resumes exactly where the last checkpoint
left off.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from fundax.data import datasets
from fundax.data import pipeline as pipeline_lib
from fundax.data import preview
from fundax.train import metric_writers

log = logging.getLogger(__name__)

# Batch fields the eval steps read besides the model inputs.
EVAL_KEYS = ("valid",)


def prepare_data(config: ml_collections.ConfigDict, workdir: str | pathlib.Path):
  """Builds (or finds) the dataset of `config.data`; returns the resolved data section.

  Args:
    config: a job config with a `data` section (fundax.data.config).
    workdir: the run's directory; an empty `data_dir` means `<workdir>/data`.

  Returns:
    A copy of `config.data` with `data_dir` filled in (the caller's config stays as given).
  """
  data = config.data.copy_and_resolve_references()
  data.data_dir = data.data_dir or str(pathlib.Path(workdir) / "data")
  summary = datasets.build_from_config(data)
  log.info("dataset %s in %s: %s", summary["dataset"], summary["data_dir"], summary["splits"])
  return data


def make_batches(config: ml_collections.ConfigDict, data: ml_collections.ConfigDict,
                 split: str, *, tokenizer: Any, max_length: int, mesh: jax.sharding.Mesh,
                 train: bool) -> pipeline_lib.GlobalBatchIterator:
  """A batch iterator over one split: endless and shuffled (train) or one padded pass (eval).

  Args:
    config: the job config (seed, resolution, flip, crop_fov, batch sizes).
    data: the resolved data section (`prepare_data`).
    split: "train", "validation", ...
    tokenizer: the text tokenizer.
    max_length: token sequence length L.
    mesh: batches become global arrays sharded over its batch axes.
    train: training iterator (shuffle, flips, random caption styles, repeat forever) or an
      evaluation pass (fixed order and captions, last batch padded with invalid examples).

  Returns:
    The iterator (`get_state`/`set_state` checkpoint its position).
  """
  source = datasets.load_from_config(data, split)
  return pipeline_lib.make_pipeline(
      source, global_batch_size=config.batch_size if train else config.eval_batch_size,
      resolution=config.resolution, max_length=max_length, tokenizer=tokenizer,
      seed=config.seed, flip=config.flip and train,
      random_caption_style=config.get("random_caption_style", True) and train,
      crop_fov=config.crop_fov, shuffle=train, num_epochs=None if train else 1, mesh=mesh,
      drop_remainder=train)


def select(batch: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
  """The device fields a step reads (host fields such as captions cannot enter jit)."""
  return {k: batch[k] for k in keys if k in batch}


def to_host(x: Any) -> np.ndarray:
  """A (possibly sharded, possibly multi-host) array as one numpy array on every process."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate(eval_fn: Callable[[dict[str, Any]], dict[str, Any]],
             batches: Iterator[dict[str, Any]], keys: Sequence[str]) -> dict[str, float]:
  """Runs `eval_fn` over every batch and averages its metrics weighted by their "count".

  Args:
    eval_fn: batch -> metrics with a "count" entry (valid examples) and per-batch means.
    batches: one pass of an eval iterator.
    keys: the batch fields eval_fn reads ("valid" is added).

  Returns:
    Metric name -> mean over all valid examples, plus "count".
  """
  totals: dict[str, float] = {}
  count = 0.0
  for batch in batches:
    metrics = jax.device_get(eval_fn(select(batch, tuple(keys) + EVAL_KEYS)))
    n = float(metrics["count"])
    count += n
    for name, value in metrics.items():
      if name != "count":
        totals[name] = totals.get(name, 0.0) + float(value) * n
  if not count:
    raise ValueError("the evaluation split yielded no valid examples")
  return {**{k: v / count for k, v in totals.items()}, "count": count}


def save_grid(path: pathlib.Path, images: np.ndarray, captions: Sequence[str], *,
              synthetic: Sequence[bool] | bool, title: str, columns: int = 4) -> None:
  """Writes a labelled PNG grid (process 0 only); synthetic tiles are stamped as such."""
  if jax.process_index() != 0:
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  grid = preview.make_grid(list(images), list(captions), synthetic=synthetic, columns=columns,
                           tile=128, title=title)
  grid.save(path)
  log.info("wrote %s", path)


@dataclasses.dataclass
class Hook:
  """A periodic action: `fn(step, state)` every `every` steps and at the end (0 = never)."""
  every: int
  fn: Callable[[int, Any], None]


def train_loop(state: Any, *, step_fn: Callable, batches: pipeline_lib.GlobalBatchIterator,
               batch_keys: Sequence[str], rng: jax.Array, extra: Sequence[Any] = (),
               num_steps: int, writer: metric_writers.MetricWriter, log_every: int,
               checkpoint_every: int, save: Callable[[int, Any], None],
               hooks: Sequence[Hook] = ()) -> Any:
  """Runs `state = step_fn(state, batch, rng, *extra)` from `state.step` up to `num_steps`.

  Args:
    state: the (restored or fresh) train state; its `step` says where to start.
    step_fn: the jitted step (`parallel.jit_step`); it donates the state it is given.
    batches: the train iterator, already positioned (`set_state`) for a resumed run.
    batch_keys: batch fields the step reads.
    rng: the run's train key (the step folds in the step number).
    extra: further step arguments (e.g. the frozen networks' params).
    num_steps: the step to stop at.
    writer: metric writer.
    log_every: steps between train-metric records.
    checkpoint_every: steps between checkpoints; the last step is always saved.
    save: `save(step, state)` writes a checkpoint (with the data position in its extras).
    hooks: periodic actions, run after the step's checkpoint decision.

  Returns:
    The final state.
  """
  start = int(jax.device_get(state.step))
  if start >= num_steps:
    log.info("nothing to do: the state is at step %d of %d", start, num_steps)
    return state
  with tqdm.tqdm(total=num_steps, initial=start, desc="train", unit="step",
                 disable=jax.process_index() != 0) as bar:
    for step in range(start + 1, num_steps + 1):
      batch = select(next(batches), batch_keys)
      state, metrics = step_fn(state, batch, rng, *extra)
      last = step == num_steps
      if step % log_every == 0 or last:
        metrics = jax.device_get(metrics)
        writer.write(step, metrics)
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
      if step % checkpoint_every == 0 or last:
        save(step, state)
      for hook in hooks:
        if hook.every and (step % hook.every == 0 or last):
          hook.fn(step, state)
      bar.update(1)
  return state
