"""Saving, loading and checking converted parameter trees.

This module owns the on-disk layout of a *params directory*: the frozen weights of one model
(the text encoder, the VAE or the UNet) next to the JSON config that rebuilds the module, so
that the directory describes itself:

```
directory/
  config.json   {"kind": "bert" | "vae" | "unet", "config": {...}, ...extra}
  params/       Orbax checkpoint of the nested-dict parameter tree
  checksums.json  SHA-256 of every file of params/, checked on every load (fundax.checksums)
  ...           files the model needs besides its weights (a text encoder's tokenizer/)
```

It also owns `check_params_match`, the one place that compares a converted tree with the tree
a module expects, so every importer reports the same, precise error.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fundax import checksums

log = logging.getLogger(__name__)

KINDS = ("bert", "vae", "unet", "evaluator", "selector")
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# Keys of config.json written by save_params itself; `extra` may not override them.
_RESERVED = ("kind", "config")


def flatten_params(tree: Any, sep: str = "/") -> dict[str, Any]:
  """Flattens a nested mapping of leaves into `{"a/b/c": leaf}`.

  Mappings (dicts, FrozenDicts) are walked in sorted key order; anything else is a leaf.

  Args:
    tree: nested mapping whose leaves are arrays (or anything with a `.shape`).
    sep: separator between path components.

  Returns:
    A flat dict from path string to leaf, in sorted path order.
  """
  flat = {}

  def walk(node, prefix):
    if isinstance(node, Mapping):
      for key in sorted(node, key=str):
        walk(node[key], prefix + (str(key),))
    else:
      flat[sep.join(prefix)] = node

  walk(tree, ())
  return flat


def unflatten_params(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """Inverse of `flatten_params`: `{"a/b": x}` -> `{"a": {"b": x}}`.

  Args:
    flat: flat mapping from path string to leaf.
    sep: separator between path components.

  Returns:
    The nested dict.
  """
  tree: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = tree
    *parents, name = path.split(sep)
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = leaf
  return tree


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(getattr(leaf, "shape", np.shape(leaf)))


def check_params_match(expected_tree: Any, loaded_tree: Any, what: str = "params") -> None:
  """Raises if two parameter trees differ in their paths or shapes.

  The error names the first mismatching path (in sorted path order) so a failed conversion
  points at the exact weight: a missing key, an unexpected key, or a shape mismatch with both
  shapes. Dtypes are not compared: conversion may legitimately change them.

  Args:
    expected_tree: the tree the module expects (arrays, `jax.ShapeDtypeStruct`s or anything
      with a `.shape`), e.g. `jax.eval_shape(model.init, ...)["params"]`.
    loaded_tree: the converted or restored tree.
    what: a name for the loaded tree used in the message, e.g. a checkpoint path.

  Raises:
    ValueError: naming the first mismatching parameter path.
  """
  expected = flatten_params(expected_tree)
  loaded = flatten_params(loaded_tree)
  problems = []
  for path in sorted(set(expected) | set(loaded)):
    if path not in loaded:
      problems.append(f"missing parameter {path!r} (expected shape {_shape(expected[path])})")
    elif path not in expected:
      problems.append(f"unexpected parameter {path!r} (shape {_shape(loaded[path])})")
    elif _shape(expected[path]) != _shape(loaded[path]):
      problems.append(f"shape mismatch for parameter {path!r}: expected "
                      f"{_shape(expected[path])}, got {_shape(loaded[path])}")
  if problems:
    more = f" (and {len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
    raise ValueError(f"{what} do not match the model: {problems[0]}{more}")


def save_params(directory: str | os.PathLike,
                params: Any,
                config: dict,
                kind: str,
                extra: dict | None = None,
                *,
                files: Mapping[str, str | os.PathLike] | None = None,
                overwrite: bool = False) -> None:
  """Writes `params` as an Orbax checkpoint plus `config.json` into `directory`.

  Args:
    directory: the params directory to create; its parent must be writable.
    params: nested dict of arrays (numpy or jax; sharded jax arrays are fine).
    config: JSON-serialisable model config that rebuilds the module.
    kind: one of "bert", "vae", "unet".
    extra: more JSON-serialisable top-level entries for config.json (e.g. the tokenizer
      reference); may not use the keys "kind" or "config".
    files: files the directory carries besides the weights, {path inside the directory: source
      file} (e.g. a tokenizer's vocabulary), so the directory works once the source is gone.
    overwrite: replace an existing params checkpoint instead of failing.

  Raises:
    ValueError: unknown kind, reserved keys in `extra`, or a non-JSON-serialisable config.
    FileExistsError: the params checkpoint exists and `overwrite` is False.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  extra = dict(extra or {})
  clash = [k for k in _RESERVED if k in extra]
  if clash:
    raise ValueError(f"extra may not set the reserved config.json keys {clash}")
  meta = {"kind": kind, "config": dict(config), **extra}
  try:
    meta_text = json.dumps(meta, indent=2, sort_keys=True)
  except TypeError as e:
    raise ValueError(f"config/extra for {kind!r} is not JSON-serialisable: {e}") from e

  directory = os.path.abspath(os.fspath(directory))
  params_path = os.path.join(directory, PARAMS_DIR)
  if os.path.exists(params_path) and not overwrite:
    raise FileExistsError(f"params checkpoint already exists: {params_path} "
                          "(pass overwrite=True to replace it)")
  os.makedirs(directory, exist_ok=True)
  # Orbax wants plain dicts; FrozenDicts and other mappings are normalised here.
  tree = unflatten_params(flatten_params(params))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(params_path, tree, force=overwrite)
  if jax.process_index() == 0:
    checksums.record(directory, (PARAMS_DIR,))
  for name, source in (files or {}).items():
    target = os.path.join(directory, name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(source, target)
  # config.json goes last: its presence marks a complete directory.
  with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
    f.write(meta_text + "\n")
  log.info("Saved %s params (%d arrays) to %s", kind, len(flatten_params(tree)), directory)


def load_meta(directory: str | os.PathLike, expected_kind: str | None = None) -> dict:
  """Reads and checks `directory/config.json` without touching the params.

  Args:
    directory: a params directory written by `save_params`.
    expected_kind: if given, the kind the directory must hold.

  Returns:
    The parsed config.json dict (with "kind" and "config").

  Raises:
    FileNotFoundError: naming the missing directory or config.json.
    ValueError: malformed config.json or a kind mismatch.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"params directory not found: {directory}")
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"missing {CONFIG_FILE} in params directory: {path}")
  with open(path, encoding="utf-8") as f:
    meta = json.load(f)
  if not isinstance(meta, dict) or "kind" not in meta or "config" not in meta:
    raise ValueError(f"{path} must be a JSON object with 'kind' and 'config' entries")
  if expected_kind is not None and meta["kind"] != expected_kind:
    raise ValueError(f"{directory} holds {meta['kind']!r} params, expected {expected_kind!r}")
  return meta


def load_params(directory: str | os.PathLike,
                expected_kind: str | None = None,
                *,
                target: Any = None) -> tuple[Any, dict]:
  """Restores a params directory written by `save_params`.

  Args:
    directory: the params directory.
    expected_kind: if given, the kind ("bert", "vae", "unet") the directory must hold.
    target: optional tree of arrays or `jax.ShapeDtypeStruct`s (with shardings) to restore
      into, e.g. the sharded abstract params of a model. It is checked against the checkpoint
      first, so a mismatch names the offending path. Without it, params come back as host
      numpy arrays in their saved dtypes, whatever devices they were saved from.

  Returns:
    `(params, meta)`: the nested-dict params and the parsed config.json.

  Raises:
    FileNotFoundError: naming the missing directory, config.json or params checkpoint.
    ValueError: kind mismatch, or `target` does not match the checkpoint.
  """
  meta = load_meta(directory, expected_kind)
  params_path = os.path.join(os.path.abspath(os.fspath(directory)), PARAMS_DIR)
  if not os.path.isdir(params_path):
    raise FileNotFoundError(f"missing params checkpoint in params directory: {params_path}")
  try:
    verified = checksums.verify(directory, (PARAMS_DIR,))
  except checksums.DamagedError as e:
    raise ValueError(f"params directory {directory} is damaged: {e}") from e
  if not verified:
    log.warning("params directory %s has no checksums (written before fundax recorded them): "
                "read unverified", directory)
  with ocp.StandardCheckpointer() as ckptr:
    stored = ckptr.metadata(params_path).item_metadata.tree
    if target is None:
      # numpy leaves make Orbax restore on the host, independent of the saving topology.
      target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), stored)
    else:
      check_params_match(target, stored, what=f"params in {params_path}")
      target = unflatten_params(flatten_params(target))
    params = ckptr.restore(params_path, target)
  return params, meta
