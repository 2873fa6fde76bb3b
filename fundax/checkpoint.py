"""Checkpoints that describe themselves and are verified: Orbax manager, save, one restore.

This module owns the checkpoint layout of a training run:

```
workdir/checkpoints/<step>/
  state/    the train state (a pytree of arrays), restored straight into target shardings
  config/   JSON: the job config, the model configs, the tokenizer reference (whatever the
            trainer passes), so a checkpoint directory alone rebuilds the models for sampling
  extras/   JSON: host-side state to resume exactly, e.g. the data-iterator position
  frozen/   optional: arrays the run uses but does not train (VAE, text encoder params),
            saved with every step so that the step directory alone can sample
  checksums.json   the SHA-256 of every file of the items above (`fundax.checksums`)
workdir/checkpoints_damaged/<step>/   steps a resumed run found damaged, kept for inspection
```

Saving is asynchronous (the step loop continues while arrays are written) and keeps the last
N steps. Orbax writes each step into a temporary directory and renames it when complete, so
an interrupted save never shows up as a step; the checksums are written into that temporary
directory once its arrays are final, just before the rename, so they are part of the step.

Every read goes through one loader, which checks the checksums of the items it reads: a step
whose files differ from their record (changed bytes, a truncated or missing file) or that
Orbax cannot read is damaged. Reading the latest step of a run (training's `restore_or_init`,
`restore_params` for sampling, scoring, evaluation and RLHF, `load_config`) skips damaged
steps for the previous intact one with a WARNING naming each, and raises `CheckpointError`
only when no step is intact. A resumed run moves the damaged steps it skipped to
`checkpoints_damaged/`, so it writes those steps anew. A step without checksums (written before
fundax recorded them) is read with a WARNING that it is unverified. A step written for a
different model or optimizer is not damage: that raises ValueError naming the first differing
leaf.

Resume order in `restore_or_init`: (1) the latest intact step in the workdir (a restarted
job), (2) an explicit resume path (another run's checkpoint), (3) params-only init (e.g.
converted pretrained weights) with a fresh optimizer, (4) scratch.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from fundax import checksums
from fundax import parallel
from fundax.interop import params_io

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "checkpoints_damaged"
STATE, CONFIG, EXTRAS, FROZEN = "state", "config", "extras", "frozen"
ITEMS = (STATE, CONFIG, EXTRAS, FROZEN)


class CheckpointError(ValueError):
  """A checkpoint is missing or damaged (bad input, like any ValueError); the message names
  its directory."""


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  """The directory holding a run's checkpoint steps: `workdir/checkpoints`."""
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_SUBDIR)


def make_manager(workdir: str | os.PathLike, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1) -> ocp.CheckpointManager:
  """The run's Orbax checkpoint manager, writing verified steps under `workdir/checkpoints`.

  Saves are asynchronous: call `wait` (or close the manager) before reading a step back or
  exiting.

  Args:
    workdir: the run's output directory (created if missing).
    max_to_keep: how many of the most recent steps to keep; None keeps all.
    save_interval_steps: `save` writes at steps that are multiples of this (and, Orbax's
      policy, at the first `save` of the manager, e.g. right after a restart).

  Returns:
    The `ocp.CheckpointManager`; close it (or use it as a context manager) when done.
  """
  directory = checkpoint_dir(workdir)
  manager = None

  def record_checksums():
    # Orbax calls this on the primary process once every process has written the step's
    # files, before it renames the temporary step directory into place: the checksums land
    # inside the step, atomically with it.
    step = manager.latest_step()
    found = glob.glob(os.path.join(glob.escape(directory), f"{step}.orbax-checkpoint-tmp*"))
    found = found or [p for p in [os.path.join(directory, str(step))] if os.path.isdir(p)]
    if not found:
      log.warning("checkpoint step %s: no directory to record checksums in; the step will read "
                  "as unverified", step)
      return
    try:
      # The one being written is the newest (an interrupted save may have left another).
      checksums.record(max(found, key=os.path.getmtime), ITEMS)
    except OSError as e:
      log.warning("checkpoint step %s: cannot record checksums (%s); the step will read as "
                  "unverified", step, e)

  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
      enable_async_checkpointing=True, create=True,
      async_options=ocp.AsyncOptions(post_finalization_callback=record_checksums))
  manager = ocp.CheckpointManager(directory, options=options, item_names=ITEMS)
  return manager


def _json_dict(value: Any, what: str) -> dict:
  if value is None:
    return {}
  if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
    value = value.to_dict()
  value = dict(value)
  try:
    # Round trip: tuples become lists now rather than differ after a restore.
    return json.loads(json.dumps(value))
  except TypeError as e:
    raise ValueError(f"checkpoint {what} is not JSON-serialisable: {e}") from e


def save(manager: ocp.CheckpointManager, step: int, state: Any, *,
         config: Mapping[str, Any] | None, extras: Mapping[str, Any] | None,
         frozen: Any = None) -> bool:
  """Saves the state, the config and the extras for `step` (if the save interval says so).

  Every process must call this with the same step (arrays are written by their owners).

  Args:
    manager: from `make_manager`.
    step: the step number, normally `int(state.step)`.
    state: the train state (pytree of arrays, possibly sharded).
    config: JSON-able dict (or ConfigDict): job config, model configs, tokenizer reference.
    extras: JSON-able dict: data-iterator state and other host-side state.
    frozen: optional pytree of arrays used but not trained (e.g. {"vae": ..., "text": ...}),
      for `restore_params`; `restore_or_init` does not read it back.

  Returns:
    Whether a checkpoint was started (False between save intervals).

  Raises:
    ValueError: config or extras are not JSON-serialisable.
  """
  items = {STATE: ocp.args.StandardSave(state),
           CONFIG: ocp.args.JsonSave(_json_dict(config, CONFIG)),
           EXTRAS: ocp.args.JsonSave(_json_dict(extras, EXTRAS))}
  if frozen is not None:
    items[FROZEN] = ocp.args.StandardSave(frozen)
  saved = manager.save(int(step), args=ocp.args.Composite(**items))
  if saved:
    log.info("saving checkpoint step %d to %s", step, manager.directory)
  return saved


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until pending asynchronous saves (and their checksums) are written."""
  manager.wait_until_finished()


def _read_only(directory: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def _candidates(path: str | os.PathLike, step: int | None = None) -> tuple[str, list[int]]:
  """Resolves a workdir, a checkpoints directory or one step directory to the steps to try.

  Returns:
    (checkpoints directory, steps newest first): only `step` (or the step directory's own)
    when one is named, else every complete step, so that a damaged one can be skipped.

  Raises:
    FileNotFoundError: the path does not exist.
    CheckpointError: the path is a file or holds no complete checkpoint step (or not `step`).
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint path not found: {path}")
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint path {path} is a file; give a training run's workdir "
                          "or its checkpoints directory")
  if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
    path = os.path.join(path, CHECKPOINT_SUBDIR)
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(os.path.join(path, CONFIG)):
    return os.path.dirname(path), [int(base)]
  with _read_only(path) as manager:
    steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise CheckpointError(f"no complete checkpoint step in {path}: expected a training run's "
                          "workdir (holding checkpoints/<step>/) or its checkpoints directory")
  if step is None:
    return path, steps
  if step not in steps:
    raise CheckpointError(f"no complete checkpoint step {step} in {path} (it has "
                          f"{sorted(steps)})")
  return path, [step]


def _verify(step_dir: str, items: Sequence[str]) -> None:
  """Checks the checksums of the items about to be read; warns when the step has none."""
  try:
    verified = checksums.verify(step_dir, items)
  except checksums.DamagedError as e:
    raise CheckpointError(f"checkpoint step {step_dir} is damaged: {e}") from e
  if not verified:
    log.warning("checkpoint step %s has no checksums (written before fundax recorded them): "
                "read unverified", step_dir)


def _first_intact(directory: str, steps: Sequence[int],
                  read: Callable[[int], Any]) -> tuple[int, Any, list[int]]:
  """`read(step)` for the newest step that is intact, warning about each damaged one.

  Returns:
    (step, what read returned, the damaged steps skipped).

  Raises:
    CheckpointError: every step is damaged; the message names each.
  """
  damaged, errors = [], []
  for step in steps:
    try:
      return step, read(step), damaged
    except CheckpointError as e:
      damaged.append(step)
      errors.append(str(e))
      if step != steps[-1]:
        log.warning("%s; falling back to the previous step", e)
  if len(errors) == 1:
    raise CheckpointError(errors[0])
  raise CheckpointError(f"no checkpoint step in {directory} is intact: " + " | ".join(errors))


def _check_state_matches(abstract_state: Any, step_dir: str) -> None:
  """Raises ValueError naming the first state leaf whose path or shape differs on disk."""
  try:
    stored = _item_tree(os.path.join(step_dir, STATE))
  except Exception as e:  # see _restore
    raise CheckpointError(f"checkpoint step {step_dir} is damaged: cannot read its state "
                          f"metadata: {type(e).__name__}: {e}") from e

  def by_path(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return params_io.unflatten_params({parallel.path_str(p): x for p, x in flat})

  # A changed model or optimizer config is not damage: say which leaf differs.
  params_io.check_params_match(by_path(abstract_state), by_path(stored),
                               what=f"the state in checkpoint step {step_dir}")


def _restore(manager: ocp.CheckpointManager, directory: str, step: int,
             abstract_state: Any) -> dict[str, Any]:
  """The verified state, config and extras of one step, the state in its target shardings."""
  step_dir = os.path.join(directory, str(step))
  _verify(step_dir, (STATE, CONFIG, EXTRAS))
  _check_state_matches(abstract_state, step_dir)
  items = {STATE: ocp.args.StandardRestore(abstract_state), CONFIG: ocp.args.JsonRestore(),
           EXTRAS: ocp.args.JsonRestore()}
  try:
    restored = manager.restore(step, directory=directory, args=ocp.args.Composite(**items))
  except Exception as e:  # Orbax raises many types for damaged files; all mean the same here.
    raise CheckpointError(f"checkpoint step {step_dir} is damaged: {type(e).__name__}: "
                          f"{e}") from e
  return {name: restored[name] for name in items}


def _read_config(step_dir: str) -> dict:
  _verify(step_dir, (CONFIG,))
  return _load_json(step_dir)


def _load_json(step_dir: str) -> dict:
  try:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
      return ckptr.restore(os.path.join(step_dir, CONFIG))
  except Exception as e:  # as in _restore
    raise CheckpointError(f"checkpoint step {step_dir} is damaged: cannot read its config: "
                          f"{type(e).__name__}: {e}") from e


def load_config(path: str | os.PathLike, *, step: int | None = None) -> dict:
  """Reads the JSON config saved with a checkpoint, without touching its arrays.

  Args:
    path: a workdir, its `checkpoints` directory or one step directory.
    step: the step of a workdir or checkpoints directory; None means the latest intact one.

  Returns:
    The config dict passed to `save`.

  Raises:
    FileNotFoundError, CheckpointError: naming the path or the damaged step directories.
  """
  directory, steps = _candidates(path, step)
  return _first_intact(directory, steps,
                       lambda s: _read_config(os.path.join(directory, str(s))))[1]


def _item_tree(item_dir: str) -> Any:
  """The metadata tree (shapes, dtypes) of an array item."""
  with ocp.PyTreeCheckpointer() as ckptr:
    # Absolute: with a relative path Orbax returns no item metadata.
    return ckptr.metadata(os.path.abspath(item_dir)).item_metadata.tree


def _restore_to_host(item_dir: str, part: Any = None) -> Any:
  """Restores an array item as host numpy arrays, or only `part` of its metadata tree.

  `part` must keep the stored structure: Orbax's partial restore silently returns the target's
  own (uninitialised) arrays for keys it does not find.
  """
  tree = _item_tree(item_dir) if part is None else part
  if not jax.tree.leaves(tree):
    return tree
  # numpy targets restore on the host, whatever topology wrote the checkpoint.
  target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree)
  restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(item_dir), args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=part is not None))


def _read_params(step_dir: str, fields: tuple[str, ...]) -> dict[str, Any]:
  """The config, the train state's `fields` and the frozen arrays of one verified step.

  Trainers save either the train state itself (the Selector, the evaluator) or a dict holding
  it under "state" beside the "frozen" arrays it uses (the VAE, the LDM, RLHF).
  """
  _verify(step_dir, (STATE, FROZEN, CONFIG))
  config = _load_json(step_dir)
  state_dir, frozen_dir = os.path.join(step_dir, STATE), os.path.join(step_dir, FROZEN)
  try:
    tree = _item_tree(state_dir)
    nested = isinstance(tree.get("state"), Mapping)
    stored = tree["state"] if nested else tree
    part = {f: stored[f] for f in fields if stored.get(f) is not None}
    if nested:
      part = {"state": part, **({"frozen": tree["frozen"]} if tree.get("frozen") else {})}
    restored = _restore_to_host(state_dir, part)
    state, frozen = (restored["state"], restored.get("frozen")) if nested else (restored, None)
    if frozen is None and os.path.isdir(frozen_dir):
      frozen = _restore_to_host(frozen_dir)
  except Exception as e:  # as in _restore: any failure here means a damaged step.
    raise CheckpointError(f"checkpoint step {step_dir} is damaged: cannot read its params: "
                          f"{type(e).__name__}: {e}") from e
  return {"config": config, "state": {f: state.get(f) for f in fields}, "frozen": frozen}


def restore_params(path: str | os.PathLike, *, step: int | None = None,
                   fields: tuple[str, ...] = ("params", "ema_params")) -> dict[str, Any]:
  """Reads the trained params (not the optimizer state), the frozen arrays and the config.

  The one reader behind sampling, scoring, evaluation, RLHF and export: arrays come back as
  host numpy arrays, independent of the mesh that wrote them, and config and arrays come from
  the same (verified) step.

  Args:
    path: a workdir, its `checkpoints` directory or one step directory.
    step: the step of a workdir or checkpoints directory; None means the latest intact one
      (damaged later steps are skipped with a WARNING naming each).
    fields: the state fields to read.

  Returns:
    {"step": int, "step_dir": its directory, "config": the config dict passed to `save`,
    "state": {field: nested dict of arrays, or None when the state has none},
    "frozen": the frozen arrays (the state's "frozen" entry, or the `frozen` item), or None}.
    The train state is the saved state itself, or its "state" entry when the trainer saved
    {"state": ..., "frozen": ...} (see `_read_params`).

  Raises:
    FileNotFoundError, CheckpointError: naming the path or the damaged step directories.
  """
  directory, steps = _candidates(path, step)
  step, restored, _ = _first_intact(
      directory, steps, lambda s: _read_params(os.path.join(directory, str(s)), tuple(fields)))
  step_dir = os.path.join(directory, str(step))
  log.info("read %s of checkpoint step %s", "+".join(fields), step_dir)
  return {"step": step, "step_dir": step_dir, **restored}


def _field(state: Any, name: str) -> Any:
  """A field of a train state that is a dataclass or a dict (None when absent)."""
  return state.get(name) if isinstance(state, Mapping) else getattr(state, name, None)


def _with_params(state: Any, params: Any, ema_params: Any) -> Any:
  fields = {"params": params}
  if ema_params is not None:
    fields["ema_params"] = ema_params
  if isinstance(state, Mapping):
    return {**state, **fields}
  return dataclasses.replace(state, **fields)


def _place_params(loaded: Any, target: Any) -> Any:
  """Puts loaded params into the structure, dtypes and shardings of `target` (arrays)."""
  by_path = params_io.flatten_params(loaded)
  flat, treedef = jax.tree_util.tree_flatten_with_path(target)
  leaves = []
  for path, t in flat:
    x = by_path[parallel.path_str(path)]
    if not isinstance(x, jax.Array):
      x = np.asarray(x)
    leaves.append(jax.device_put(x.astype(t.dtype), t.sharding))
  return jax.tree.unflatten(treedef, leaves)


def _params_init(abstract_state: Any, init_fn: Callable[[], Any],
                 params_init: Callable[[], Any]) -> Any:
  params = params_init()
  params_io.check_params_match(_field(abstract_state, "params"), params,
                               what="params from params_init")
  # The fresh state supplies the optimizer state (which depends on shapes, not values).
  state = init_fn()
  placed = _place_params(params, _field(state, "params"))
  # EMA starts at the loaded params, as a separate copy: the state's buffers are donated.
  has_ema = _field(state, "ema_params") is not None
  ema = jax.tree.map(lambda x: x.copy(), placed) if has_ema else None
  return _with_params(state, placed, ema)


def restore_or_init(manager: ocp.CheckpointManager, abstract_state: Any,
                    init_fn: Callable[[], Any], *,
                    resume_path: str | os.PathLike | None = None,
                    params_init: Callable[[], Any] | None = None) -> tuple[Any, dict, str]:
  """The train state to start from, in resume order; logs which source was used.

  Args:
    manager: the run's manager (`make_manager(workdir)`).
    abstract_state: pytree of `jax.ShapeDtypeStruct`s with target shardings, e.g. from
      `parallel.abstract_sharded(make_state, rng, mesh, rules)`; restored arrays get them.
    init_fn: () -> a fresh, sharded state (e.g. `parallel.init_sharded(...)` in a lambda).
    resume_path: another run's workdir, checkpoints directory or step directory; used only
      when the workdir has no checkpoint yet.
    params_init: () -> a nested dict of params (e.g. converted pretrained weights via
      `params_io.load_params`); used when there is no checkpoint and no resume path. They
      replace the fresh state's params (and EMA) with the state's dtypes and shardings.

  Returns:
    `(state, extras, source)`: extras is the dict saved with the checkpoint ({} for the
    params and scratch sources); source is "workdir", "resume", "params" or "scratch".

  Raises:
    FileNotFoundError: the resume path does not exist.
    CheckpointError: no step of the workdir (or of the resume path) is intact; the message
      names the damaged step directories.
    ValueError: the checkpoint's state, or the params from params_init, do not match
      `abstract_state` (naming the first differing path).
  """
  if manager.latest_step() is not None:
    directory = os.fspath(manager.directory)
    steps = sorted(manager.all_steps(), reverse=True)
    source = "workdir"
  elif resume_path is not None:
    directory, steps = _candidates(resume_path)
    source = "resume"
  elif params_init is not None:
    log.info("initialising the state from params_init (no checkpoint in %s)", manager.directory)
    return _params_init(abstract_state, init_fn, params_init), {}, "params"
  else:
    log.info("initialising the state from scratch (no checkpoint in %s)", manager.directory)
    return init_fn(), {}, "scratch"
  step, restored, damaged = _first_intact(
      directory, steps, lambda s: _restore(manager, directory, s, abstract_state))
  if damaged and source == "workdir":
    _set_aside(manager, damaged)
  log.info("restored the state from %s: step %d of %s", source, step, directory)
  return restored[STATE], restored[EXTRAS], source


def _set_aside(manager: ocp.CheckpointManager, steps: Sequence[int]) -> None:
  """Moves damaged steps of the run to `checkpoints_damaged/`, so the run saves them anew.

  Orbax never saves at or below the latest step it finds, so a damaged step left in place
  would stay there (and be skipped again after the next interruption).
  """
  directory = os.fspath(manager.directory)
  aside = os.path.join(os.path.dirname(directory), DAMAGED_SUBDIR)
  if jax.process_index() == 0:
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      target, n = os.path.join(aside, str(step)), 1
      while os.path.exists(target):
        target, n = os.path.join(aside, f"{step}.{n}"), n + 1
      os.rename(os.path.join(directory, str(step)), target)
      log.warning("moved the damaged checkpoint step %s to %s; this run writes step %d anew",
                  os.path.join(directory, str(step)), target, step)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("fundax: damaged checkpoint steps set aside")
  manager.reload()
