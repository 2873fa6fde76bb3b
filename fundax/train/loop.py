"""Loop helpers shared by the trainers: data setup, the step loop, evaluation, grids.

This module owns what every trainer does around its pure step function: checking the config
fields every trainer shares before any compute (`check_common`), building the dataset a config
names, making train/eval batch iterators, and `train_loop`, which runs the jitted step from the
state's step to `num_steps` with a progress bar, records metrics (`MetricWriter`), calls
periodic hooks (evaluation, sample grids) and saves checkpoints whose extras carry the
data-iterator position, so that a rerun resumes exactly where the last checkpoint left off.
The VAE and LDM trainers, the Selector (`fundax.selector.train`) and the evaluator
(`fundax.eval.evaluator_train`) all run `train_loop`; the RLHF rounds (`fundax.rl.rounds`),
whose unit of work is a stage rather than a step, use its `Preemption`, `NonFiniteCounter` and
`check_weights` directly.

Ways a run ends early, each leaving a checkpoint to resume from:
  * preemption: SIGTERM (what Cloud TPU, Kubernetes and SLURM send before they stop a job) or
    SIGINT (Ctrl-C) lets the current step finish, saves a checkpoint at it and returns with
    `preempted` naming the signal; rerunning the same command continues from that step. A
    second Ctrl-C raises KeyboardInterrupt at once, without saving.
  * non-finite losses: a step whose loss or gradients are NaN/inf leaves the params alone and
    reports `nonfinite = 1` (see `fundax.train.guard`); the loop counts them and, after
    `max_nonfinite` in a row, saves the (last finite) state and raises `NonFiniteLossError`.
  * non-finite weights or metrics: params or EMA params holding NaN/inf are never saved
    (`NonFiniteWeightsError`; the last checkpoint stays the last good state), and an
    evaluation whose metrics are NaN/inf stops the run (`NonFiniteMetricError`) instead of
    being recorded as a result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import pathlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from fundax import checkpoint
from fundax import images as images_lib
from fundax import parallel
from fundax.data import datasets
from fundax.data import pipeline as pipeline_lib
from fundax.train import metric_writers

log = logging.getLogger(__name__)

# Batch fields the eval steps read besides the model inputs.
EVAL_KEYS = ("valid",)
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
DTYPES = ("float32", "bfloat16", "float16")


class NonFiniteLossError(FloatingPointError):
  """Too many consecutive steps had a NaN/inf loss or gradient (their updates were skipped)."""


class NonFiniteWeightsError(FloatingPointError):
  """The params or EMA params hold NaN/inf values; they were not saved."""


class NonFiniteMetricError(FloatingPointError):
  """An evaluation gave NaN/inf metrics; they were not recorded."""


def check_common(config: ml_collections.ConfigDict) -> list[str]:
  """Problems with the config fields every trainer shares; empty when there are none.

  Runs before any dataset build or compile, so a bad value fails in a second, not after the
  data is built. Reads only the config and the device count.

  Args:
    config: a trainer config (configs/vae.py or configs/ldm.py layout).

  Returns:
    One message per problem, naming the field and its value.
  """
  problems = []
  if config.prng_impl not in PRNG_IMPLS:
    problems.append(f"prng_impl must be one of {PRNG_IMPLS}, got {config.prng_impl!r}")
  if config.resolution < 8:
    problems.append(f"resolution must be at least 8 px, got {config.resolution}")
  if config.num_steps < 1:
    problems.append(f"num_steps must be >= 1, got {config.num_steps}")
  if not 0 <= config.stop_at_step <= max(config.num_steps, 0):
    problems.append(f"stop_at_step must be in [0, num_steps={config.num_steps}], "
                    f"got {config.stop_at_step}")
  for name in ("log_every", "checkpoint_every", "max_to_keep", "max_nonfinite_steps"):
    if config[name] < 1:
      problems.append(f"{name} must be >= 1, got {config[name]}")
  if config.eval_every < 0:
    problems.append(f"eval_every must be >= 0 (0 disables), got {config.eval_every}")
  if config.optim.lr <= 0:
    problems.append(f"optim.lr must be > 0, got {config.optim.lr}")
  if config.optim.warmup_steps < 0:
    problems.append(f"optim.warmup_steps must be >= 0, got {config.optim.warmup_steps}")
  try:
    mesh = parallel.mesh_shape(config.mesh, jax.device_count())
  except ValueError as e:
    problems.append(f"mesh: {e}")
  else:
    ways = 1
    for axis in parallel.BATCH_AXES:
      ways *= mesh.get(axis, 1)
    for name in ("batch_size", "eval_batch_size"):
      if config[name] < 1 or config[name] % ways:
        problems.append(
            f"{name} {config[name]} is not a positive multiple of the {ways} data-parallel "
            f"devices of the mesh {mesh} ({jax.device_count()} devices, and batch sizes are "
            "global)")
  return problems


def raise_if_invalid(problems: Sequence[str], what: str) -> None:
  """Raises one ValueError listing every problem (nothing when there are none)."""
  if problems:
    raise ValueError(f"invalid {what} config: " + "; ".join(problems))


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
    config: the job config (seed, resolution, flip, crop_fov, canonical_eye, batch sizes).
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
      crop_fov=config.crop_fov, canonical_eye=config.get("canonical_eye", ""), shuffle=train,
      num_epochs=None if train else 1, mesh=mesh,
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
  means = {k: v / count for k, v in totals.items()}
  bad = sorted(k for k, v in means.items() if not math.isfinite(v))
  if bad:
    raise NonFiniteMetricError(
        f"evaluation metrics {bad} are NaN/inf (the weights give non-finite outputs); stopping "
        "instead of recording them: lower optim.lr or check the data, then rerun to resume")
  return {**means, "count": count}


def save_grid(path: pathlib.Path, images: np.ndarray, captions: Sequence[str], *,
              synthetic: Sequence[bool] | bool, title: str, columns: int = 4) -> None:
  """Writes a labelled PNG grid (process 0 only); synthetic tiles are stamped as such."""
  if jax.process_index() != 0:
    return
  images_lib.save_grid(path, images, captions, synthetic=synthetic, columns=columns, tile=128,
                       title=title)


@dataclasses.dataclass
class Hook:
  """A periodic action: `fn(step, state)` every `every` steps and at the end (0 = never)."""
  every: int
  fn: Callable[[int, Any], None]


class LoopResult(NamedTuple):
  """How `train_loop` ended.

  Attributes:
    state: the final state.
    preempted: "" when the loop ran to its end; else the signal ("SIGTERM", "SIGINT") that
      stopped it after saving the state at its step.
    nonfinite_steps: steps of this call whose update was skipped for a NaN/inf loss.
  """
  state: Any
  preempted: str
  nonfinite_steps: int


class Preemption:
  """Catches SIGTERM and SIGINT while a training loop runs; restores the old handlers on exit.

  The first signal sets `signal` (its name) and the loop finishes its unit of work (a step, an
  RLHF stage), saves and returns; a second Ctrl-C raises KeyboardInterrupt at once. Handlers
  can be installed from the main thread only; elsewhere `signal` stays "". A context entered
  while another is active (a Selector retrained inside an RLHF stage) installs nothing and
  never sets `signal`: the outer one holds the signal, so the inner loop runs to its end and
  the outer unit of work is finished and saved whole.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)
  _active: Preemption | None = None  # the context whose handlers are installed

  def __init__(self):
    self.signal = ""
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signal and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop at once
    self.signal = signal.Signals(signum).name
    log.warning("%s: finishing this step, saving a checkpoint and stopping (Ctrl-C again stops "
                "at once, without saving)", self.signal)

  def __enter__(self):
    if (Preemption._active is None
        and threading.current_thread() is threading.main_thread()):
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
      Preemption._active = self
    return self

  def __exit__(self, *exc):
    if Preemption._active is self:
      for s, handler in self._previous.items():
        signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set from C
      Preemption._active = None


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  """bool scalar: every floating-point entry of `tree` is finite."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def check_weights(state: Any, step: int) -> None:
  """Raises NonFiniteWeightsError when the state's params or EMA params hold NaN/inf.

  Called before every save, so that the last checkpoint is always the last good state.
  """
  weights = {name: getattr(state, name, None) for name in ("params", "ema_params")}
  bad = [name for name, tree in weights.items()
         if tree is not None and not bool(_all_finite(tree))]
  if bad:
    raise NonFiniteWeightsError(
        f"the {' and '.join(bad)} at step {step} hold NaN/inf values; not saved, so the last "
        "checkpoint stays the last good state: lower optim.lr or check the data, then rerun "
        "to resume from it")


class NonFiniteCounter:
  """Counts skipped (NaN/inf) steps, i.e. metrics with `nonfinite = 1` (`fundax.train.guard`).

  `add` queues a step's flag and `resolve` reads the queued ones; `train_loop` resolves one
  step late (after the next step is dispatched), so the host never waits for the device just
  to look at a flag. `resolve` returns True once `limit` steps in a row were skipped.
  """

  def __init__(self, limit: int):
    self.limit = limit
    self.total = 0
    self.run = 0
    self._pending: list[tuple[int, Any]] = []

  def add(self, step: int, metrics: dict[str, Any]) -> None:
    if "nonfinite" in metrics:
      self._pending.append((step, metrics["nonfinite"]))

  def resolve(self) -> bool:
    """Reads the pending flags; True when the limit of consecutive skips is reached."""
    for step, flag in self._pending:
      if float(jax.device_get(flag)) > 0:
        self.total += 1
        self.run += 1
        log.warning("step %d: non-finite loss or gradients; update skipped (%d in a row, "
                    "%d in total)", step, self.run, self.total)
      else:
        self.run = 0
    self._pending.clear()
    return self.run >= self.limit


def train_loop(state: Any, *, step_fn: Callable, batches: Iterator[dict[str, Any]],
               batch_keys: Sequence[str] | None, rng: jax.Array, extra: Sequence[Any] = (),
               num_steps: int, writer: metric_writers.MetricWriter | None, log_every: int,
               checkpoint_every: int, save: Callable[[int, Any], None] | None,
               hooks: Sequence[Hook] = (), max_nonfinite: int = 10,
               desc: str = "train") -> LoopResult:
  """Runs `state = step_fn(state, batch, rng, *extra)` from `state.step` up to `num_steps`.

  Every trainer runs its steps here: the VAE and the LDM, the Selector, the evaluator (and
  the TSTR / C2ST classifiers, which keep no checkpoints).

  Args:
    state: the (restored or fresh) train state; its `step` says where to start.
    step_fn: the jitted step (`parallel.jit_step`); it donates the state it is given. Its
      metrics hold "loss" and may hold "nonfinite" (1 when the step skipped its update,
      `fundax.train.guard`).
    batches: yields the batch of each step in order, already positioned (`set_state`, or
      started at the state's step) for a resumed run.
    batch_keys: batch fields the step reads; None: the whole batch.
    rng: the run's train key (the step folds in the step number).
    extra: further step arguments (e.g. the frozen networks' params).
    num_steps: the step to stop at.
    writer: metric writer; None records nothing.
    log_every: steps between train-metric records (and progress-bar loss updates).
    checkpoint_every: steps between checkpoints; the last step is always saved.
    save: `save(step, state)` writes a checkpoint (with the data position in its extras).
      None: a run that keeps no checkpoints, which therefore leaves SIGTERM and Ctrl-C alone
      (there is nothing to save or resume) and checks no weights.
    hooks: periodic actions, run after the step's checkpoint decision.
    max_nonfinite: consecutive skipped (non-finite) steps after which the run stops.
    desc: the progress bar's label.

  Returns:
    A `LoopResult`. On SIGTERM or SIGINT the current step is finished and saved, hooks are
    not run, and the result's `preempted` names the signal.

  Raises:
    NonFiniteLossError: `max_nonfinite` consecutive steps were skipped; the state (the last
      finite one) is saved first.
    NonFiniteWeightsError: the params or EMA params to save hold NaN/inf (not saved).
    NonFiniteMetricError: from a hook's `evaluate`.
  """
  start = int(jax.device_get(state.step))
  if start >= num_steps:
    log.info("nothing to do: the state is at step %d of %d", start, num_steps)
    return LoopResult(state, "", 0)
  nonfinite = NonFiniteCounter(max_nonfinite)
  # Without checkpoints a Preemption is never entered: its `signal` stays "".
  signals = Preemption() if save is not None else contextlib.nullcontext(Preemption())
  with signals as preemption, tqdm.tqdm(
      total=num_steps, initial=start, desc=desc, unit="step",
      disable=jax.process_index() != 0) as bar:
    for step in range(start + 1, num_steps + 1):
      batch = next(batches)
      state, metrics = step_fn(state, batch if batch_keys is None else select(batch, batch_keys),
                               rng, *extra)
      stop = nonfinite.resolve()  # the previous step's flag
      nonfinite.add(step, metrics)
      last = step == num_steps
      if step % log_every == 0 or last:
        stop = nonfinite.resolve() or stop
        metrics = jax.device_get(metrics)
        if writer is not None:
          writer.write(step, {**metrics, "nonfinite_total": nonfinite.total})
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
      if last:
        stop = nonfinite.resolve() or stop
      if save is not None and (step % checkpoint_every == 0 or last or stop
                               or preemption.signal):
        check_weights(state, step)
        save(step, state)
      if stop:
        raise NonFiniteLossError(
            f"{nonfinite.run} consecutive steps (up to step {step}) had a non-finite loss or "
            f"gradients and were skipped ({nonfinite.total} in this run); stopping. "
            + (f"The last finite state is saved at step {step}: lower optim.lr or check the "
               "data, then rerun to resume" if save is not None else
               "Lower the learning rate or check the data"))
      if preemption.signal:
        log.warning("preempted (%s): saved a checkpoint at step %d; rerun to resume",
                    preemption.signal, step)
        bar.update(1)
        return LoopResult(state, preemption.signal, nonfinite.total)
      for hook in hooks:
        if hook.every and (step % hook.every == 0 or last):
          hook.fn(step, state)
      bar.update(1)
  return LoopResult(state, "", nonfinite.total)


def status(result: LoopResult, num_steps: int) -> dict[str, str]:
  """The output entries that say how a run ended, for a trainer's outputs ({} when done).

  A run that ended before `num_steps` (a signal, or `stop_at_step`) says so under
  "unfinished", so that callers (the main job) do not take its checkpoint for a finished model;
  a preempted one also names the signal under "preempted" (the CLI exits with its own code).
  Skipped NaN/inf updates are counted under "nonfinite_steps".
  """
  out = {}
  step = int(jax.device_get(result.state.step))
  if result.preempted:
    out["unfinished"] = (f"preempted ({result.preempted}) at step {step} of {num_steps}, saved; "
                         "rerun the command to resume")
    out["preempted"] = result.preempted
  elif step < num_steps:
    out["unfinished"] = (f"stopped at step {step} of {num_steps} (stop_at_step), saved; rerun "
                         "without it to finish")
  if result.nonfinite_steps:
    out["nonfinite_steps"] = f"{result.nonfinite_steps} updates skipped (NaN/inf loss)"
  return out


def outputs(workdir: pathlib.Path, writer: metric_writers.MetricWriter, result: LoopResult,
            samples_dir: pathlib.Path, num_steps: int) -> dict[str, str]:
  """What the VAE and LDM trainers' `run` returns for the CLI to print: output name -> path
  (or note), with `status`'s entries."""
  return {"workdir": str(workdir), "metrics": str(writer.jsonl_path),
          "checkpoints": checkpoint.checkpoint_dir(workdir), "samples": str(samples_dir),
          **status(result, num_steps)}
