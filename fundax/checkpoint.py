"""Checkpoints that describe themselves: Orbax manager, save, restore-or-init, config reading.

This module owns the checkpoint layout of a training run:

```
workdir/checkpoints/<step>/
  state/    the train state (a pytree of arrays), restored straight into target shardings
  config/   JSON: the job config, the model configs, the tokenizer reference (whatever the
            trainer passes), so a checkpoint directory alone rebuilds the models for sampling
  extras/   JSON: host-side state to resume exactly, e.g. the data-iterator position
  frozen/   optional: arrays the run uses but does not train (VAE, text encoder params),
            saved with every step so that the step directory alone can sample
```

Saving is asynchronous (the step loop continues while arrays are written) and keeps the last
N steps. Orbax writes each step into a temporary directory and renames it when complete, so
an interrupted save never shows up as a step. A step that is visible but fails to restore
(damaged files, a partial copy) makes `restore_or_init` fall back to the previous step with a
WARNING naming the damaged directory, so a preempted job still resumes; only when no step of
the workdir restores does it raise `CheckpointError`. A step written for a different model or
optimizer is not damage: that raises ValueError naming the first differing leaf.

Resume order in `restore_or_init`: (1) the latest step in the workdir (a restarted job),
(2) an explicit resume path (another run's checkpoint), (3) params-only init (e.g. converted
pretrained weights) with a fresh optimizer, (4) scratch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fundax import parallel
from fundax.interop import params_io

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
STATE, CONFIG, EXTRAS, FROZEN = "state", "config", "extras", "frozen"
ITEMS = (STATE, CONFIG, EXTRAS, FROZEN)


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be read; the message names its directory."""


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  """The directory holding a run's checkpoint steps: `workdir/checkpoints`."""
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_SUBDIR)


def make_manager(workdir: str | os.PathLike, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, async_: bool = True) -> ocp.CheckpointManager:
  """The run's Orbax checkpoint manager, writing under `workdir/checkpoints`.

  Args:
    workdir: the run's output directory (created if missing).
    max_to_keep: how many of the most recent steps to keep; None keeps all.
    save_interval_steps: `save` writes at steps that are multiples of this (and, Orbax's
      policy, at the first `save` of the manager, e.g. right after a restart).
    async_: write arrays in a background thread; call `wait` before reading them back or
      exiting.

  Returns:
    The `ocp.CheckpointManager`; close it (or use it as a context manager) when done.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
      enable_async_checkpointing=async_, create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


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
  """Blocks until pending asynchronous saves are written."""
  manager.wait_until_finished()


def _find_step(path: str | os.PathLike, step: int | None = None) -> tuple[str, int]:
  """Resolves a workdir, a checkpoints directory or one step directory to (directory, step).

  `step` picks a step of a workdir or checkpoints directory; None means the latest.

  Raises:
    FileNotFoundError: the path does not exist.
    CheckpointError: the path holds no complete checkpoint step (or not `step`).
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint path not found: {path}")
  if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
    path = os.path.join(path, CHECKPOINT_SUBDIR)
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(os.path.join(path, STATE)):
    return os.path.dirname(path), int(base)
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(path, options=options, item_names=ITEMS) as manager:
    steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"no complete checkpoint step in {path}")
  if step is None:
    return path, max(steps)
  if step not in steps:
    raise CheckpointError(f"no complete checkpoint step {step} in {path} (it has {steps})")
  return path, step


def _check_state_matches(abstract_state: Any, step_dir: str) -> None:
  """Raises ValueError naming the first state leaf whose path or shape differs on disk."""
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      stored = ckptr.metadata(os.path.abspath(os.path.join(step_dir, STATE))).item_metadata.tree
  except Exception as e:  # see _restore
    raise CheckpointError(f"cannot read the state metadata of checkpoint step {step_dir}: "
                          f"{type(e).__name__}: {e}") from e

  def by_path(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return params_io.unflatten_params({parallel.path_str(p): x for p, x in flat})

  # A changed model or optimizer config is not damage: say which leaf differs.
  params_io.check_params_match(by_path(abstract_state), by_path(stored),
                               what=f"the state in checkpoint step {step_dir}")


def _restore(manager: ocp.CheckpointManager, directory: str, step: int,
             abstract_state: Any | None) -> dict[str, Any]:
  items = {CONFIG: ocp.args.JsonRestore(), EXTRAS: ocp.args.JsonRestore()}
  step_dir = os.path.join(directory, str(step))
  if abstract_state is not None:
    _check_state_matches(abstract_state, step_dir)
    items[STATE] = ocp.args.StandardRestore(abstract_state)
  try:
    restored = manager.restore(step, directory=directory, args=ocp.args.Composite(**items))
  except Exception as e:  # Orbax raises many types for damaged files; all mean the same here.
    raise CheckpointError(
        f"cannot restore checkpoint step {step_dir}: {type(e).__name__}: {e}") from e
  return {name: restored[name] for name in items}


def load_config(path: str | os.PathLike, *, step: int | None = None) -> dict:
  """Reads the JSON config saved with a checkpoint, without touching its arrays.

  Args:
    path: a workdir, its `checkpoints` directory or one step directory.
    step: the step of a workdir or checkpoints directory; None means the latest.

  Returns:
    The config dict passed to `save`.

  Raises:
    FileNotFoundError, CheckpointError: naming the path.
  """
  directory, step = _find_step(path, step)
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(directory, options=options, item_names=ITEMS) as manager:
    return _restore(manager, directory, step, None)[CONFIG]


def _restore_to_host(item_dir: str, keys: tuple[str, ...] | None = None) -> Any:
  """Restores an array item (or the given top-level keys of it) as host numpy arrays."""
  with ocp.PyTreeCheckpointer() as ckptr:
    # Absolute: with a relative path Orbax returns no item metadata.
    tree = ckptr.metadata(os.path.abspath(item_dir)).item_metadata.tree
    if keys is not None:
      tree = {k: tree[k] for k in keys if tree.get(k) is not None}
    # numpy targets restore on the host, whatever topology wrote the checkpoint.
    target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree)
    restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=keys is not None))


def restore_params(path: str | os.PathLike, *, step: int | None = None,
                   fields: tuple[str, ...] = ("params", "ema_params")) -> dict[str, Any]:
  """Reads the trained params (not the optimizer state) and the frozen arrays of a checkpoint.

  For sampling and export: arrays come back as host numpy arrays, independent of the mesh
  that wrote them.

  Args:
    path: a workdir, its `checkpoints` directory or one step directory.
    step: the step of a workdir or checkpoints directory; None means the latest.
    fields: the state fields to read.

  Returns:
    {"step": int, "state": {field: nested dict of arrays, or None when the state has none},
    "frozen": the frozen pytree passed to `save`, or None}.

  Raises:
    FileNotFoundError, CheckpointError: naming the path or the damaged step directory.
  """
  directory, step = _find_step(path, step)
  step_dir = os.path.join(directory, str(step))
  try:
    state = _restore_to_host(os.path.join(step_dir, STATE), tuple(fields))
    frozen_dir = os.path.join(step_dir, FROZEN)
    frozen = _restore_to_host(frozen_dir) if os.path.isdir(frozen_dir) else None
  except Exception as e:  # as in _restore: any failure here means a damaged step.
    raise CheckpointError(f"cannot read params of checkpoint step {step_dir}: "
                          f"{type(e).__name__}: {e}") from e
  log.info("read %s of checkpoint step %s", "+".join(fields), step_dir)
  return {"step": step, "state": {f: state.get(f) for f in fields}, "frozen": frozen}


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
    CheckpointError: no step of the workdir can be restored (damaged steps are skipped
      with a warning), or the resume path holds none; the message names the directories.
    ValueError: the checkpoint's state, or the params from params_init, do not match
      `abstract_state` (naming the first differing path).
  """
  if manager.latest_step() is not None:
    return _restore_latest_good(manager, abstract_state)
  if resume_path is not None:
    directory, step = _find_step(resume_path)
    source = "resume"
  elif params_init is not None:
    log.info("initialising the state from params_init (no checkpoint in %s)", manager.directory)
    return _params_init(abstract_state, init_fn, params_init), {}, "params"
  else:
    log.info("initialising the state from scratch (no checkpoint in %s)", manager.directory)
    return init_fn(), {}, "scratch"
  restored = _restore(manager, directory, step, abstract_state)
  log.info("restored the state from %s: step %d of %s", source, step, directory)
  return restored[STATE], restored[EXTRAS], source


def _restore_latest_good(manager: ocp.CheckpointManager,
                         abstract_state: Any) -> tuple[Any, dict, str]:
  """Restores the newest step of the workdir that is intact, warning about damaged ones."""
  directory = os.fspath(manager.directory)
  errors = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = _restore(manager, directory, step, abstract_state)
    except CheckpointError as e:
      log.warning("checkpoint step %s is damaged; falling back to the previous step (%s)",
                  os.path.join(directory, str(step)), e)
      errors.append(str(e))
      continue
    log.info("restored the state from workdir: step %d of %s", step, directory)
    return restored[STATE], restored[EXTRAS], "workdir"
  raise CheckpointError(f"no checkpoint step in {directory} could be restored: "
                        + " | ".join(errors))
