"""Loading job configs: `--config FILE[:ARG]` plus `--config.a.b=VALUE` overrides.

Configs are Python files under `configs/` with `get_config(arg=None)` returning a locked
`ml_collections.ConfigDict` (big_vision / flax-examples style). Overrides are type-checked by
ml_collections itself: an unknown key or a value of the wrong type fails here, before any
compute starts.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import ml_collections


class ConfigError(ValueError):
  """A config file or override that cannot be applied (unknown key, wrong type, bad syntax)."""


# The repository root: configs/ lives beside the fundax package in a source checkout.
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def resolve_config_path(path: str) -> pathlib.Path:
  """Finds a config file: as given (relative to the working directory), else in the repo root."""
  candidate = pathlib.Path(path)
  if candidate.is_file():
    return candidate
  in_repo = REPO_ROOT / path
  if in_repo.is_file():
    return in_repo
  raise FileNotFoundError(
      f"config file {path!r} not found (looked in {pathlib.Path.cwd()} and {REPO_ROOT})")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `FILE[:ARG]`: imports FILE and returns `get_config(ARG)` (locked).

  Args:
    spec: path of a Python config file, optionally followed by `:` and an argument string that
      selects a variant (e.g. `configs/phantom.py:tiny`).

  Returns:
    The locked ConfigDict.
  """
  path, _, arg = spec.partition(":")
  file = resolve_config_path(path)
  module_spec = importlib.util.spec_from_file_location(f"fundax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {file} has no get_config(arg) function")
  config = module.get_config(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{file}: get_config must return an ml_collections.ConfigDict")
  config.lock()
  return config


def parse_value(text: str):
  """A Python literal when the text is one (`3`, `1e-4`, `(1, 2)`, `True`), else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]):
  """Applies `a.b=value` overrides in place; unknown keys and wrong types raise.

  Args:
    config: a (locked) ConfigDict.
    overrides: strings `dotted.key=value`, as given after `--config.` on the command line.

  Returns:
    The same config, for chaining.
  """
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} must look like --config.a.b=value")
    node = config
    *parents, leaf = key.split(".")
    for i, part in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(f"--config.{key}: no field {'.'.join(parents[:i + 1])!r} in the config")
      node = node[part]
    if leaf not in node:
      raise ConfigError(f"--config.{key}: no field {key!r} in the config")
    old = node[leaf]
    value = parse_value(raw)
    if isinstance(old, str) and not isinstance(value, str):
      value = raw
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"--config.{key}={raw}: {e}") from e
  return config


def split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` / `--config.a.b v` overrides from the other arguments."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      body = arg[len("--config."):]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise ConfigError(f"{arg} needs a value")
        body = f"{body}={argv[i + 1]}"
        i += 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides
