"""Loading job configs: `--config NAME[:ARG]` or `FILE[:ARG]`, and `--config.a.b=VALUE` overrides.

Configs are Python files with `get_config(arg=None)` returning a locked
`ml_collections.ConfigDict` (big_vision / flax-examples style). The repository's top-level
`configs/` ships inside the package as `fundax.configs` (setup.py maps one onto the other), so
a config is found by name (`main:tiny`) from any directory, in a checkout and in an installed
wheel alike; a path (`configs/main.py:tiny`, `~/my_ldm.py`) is read as given. Overrides are
type-checked by ml_collections itself: an unknown key or a value of the wrong type fails here,
before any compute starts.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import ml_collections


class ConfigError(ValueError):
  """A config file or override that cannot be applied (unknown key, wrong type, bad syntax)."""


def shipped_configs() -> dict[str, pathlib.Path]:
  """Name -> file of every config that ships with fundax (the package `fundax.configs`)."""
  from fundax import configs  # pylint: disable=g-import-not-at-top  # the checkout's configs/
  directory = pathlib.Path(configs.__file__).parent
  return {p.stem: p for p in sorted(directory.glob("*.py")) if p.stem != "__init__"}


def resolve_config_path(path: str) -> pathlib.Path:
  """Finds a config file: a path as given (relative to the working directory), else the shipped
  config `NAME` (also spelled `configs/NAME.py`, the checkout's layout, from any directory)."""
  candidate = pathlib.Path(path).expanduser()
  if candidate.is_file():
    return candidate
  shipped = shipped_configs()
  in_checkout_layout = candidate.parent == pathlib.Path("configs") and candidate.suffix == ".py"
  name = candidate.stem if in_checkout_layout else path
  if name in shipped:
    return shipped[name]
  raise FileNotFoundError(
      f"config {path!r} is neither a file (looked in {pathlib.Path.cwd()}) nor a shipped "
      f"config ({', '.join(shipped)})")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `NAME[:ARG]` or `FILE[:ARG]`: imports the file and returns `get_config(ARG)` (locked).

  Args:
    spec: a shipped config's name or the path of a Python config file, optionally followed by
      `:` and an argument string that selects a variant (e.g. `main:tiny`,
      `configs/main.py:tiny`).

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
