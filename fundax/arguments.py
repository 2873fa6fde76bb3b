"""Checks of command-line arguments and paths, made before a command starts any work.

`fundax.cli` parses with `Parser`, types numeric flags with `number` (finite, in range) and
checks every input and output path with `existing`, `writable_dir` and `writable_file`. Each
failure is a `UsageError` whose message names the flag, the path and what is wrong, which the
CLI prints as one line (`fundax: error: ...`, exit status 2).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib


class UsageError(ValueError):
  """A bad command line: the message names the flag or path and what to do."""


class Parser(argparse.ArgumentParser):
  """argparse with errors raised as UsageError: one line, like every other user error."""

  def error(self, message):
    raise UsageError(f"{message} (see {self.prog} --help)")


def number(kind: type, low: float | None = None, high: float | None = None, *,
           above: bool = False):
  """An argparse type: an int or a finite float in [low, high] ((low, high] with `above`)."""
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"{'an integer' if kind is int else 'a number'} is needed, got {text!r}") from None
    if not math.isfinite(value):
      raise argparse.ArgumentTypeError(f"a finite number is needed, got {text!r}")
    if low is not None and (value <= low if above else value < low):
      raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low}, got {text}")
    if high is not None and value > high:
      raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
    return value
  return parse


def _nearest_existing(path: pathlib.Path) -> pathlib.Path:
  while not path.exists() and path != path.parent:
    path = path.parent
  return path


def writable_dir(path: str, flag: str, given: str | None = None) -> None:
  """Fails unless `path` is, or can be created as, a directory this process can write.

  `given` is what the user typed when `path` is derived from it (a file's folder).
  """
  target = pathlib.Path(path).expanduser().absolute()
  nearest = _nearest_existing(target)
  if given is None and nearest == target and not target.is_dir():
    raise UsageError(f"{flag} {path} is a file, not a directory")
  if not nearest.is_dir():
    raise UsageError(f"{flag} {given or path}: {nearest} is a file, so the directory cannot "
                     "be made")
  if not os.access(nearest, os.W_OK | os.X_OK):
    raise UsageError(f"{flag} {given or path}: {nearest} is not writable")


def writable_file(path: str, flag: str, suffixes: tuple[str, ...] = ()) -> None:
  """Fails unless `path` names a file this process can write (its folder may be made)."""
  target = pathlib.Path(path).expanduser().absolute()
  if suffixes and target.suffix.lower() not in suffixes:
    raise UsageError(f"{flag} {path}: the file name must end in {' or '.join(suffixes)}")
  if target.is_dir():
    raise UsageError(f"{flag} {path} is a directory; give a file name")
  if target.exists() and not os.access(target, os.W_OK):
    raise UsageError(f"{flag} {path} is not writable")
  writable_dir(str(target.parent), flag, given=path)


def existing(path: str, flag: str, *, directory: bool) -> None:
  """Fails unless `path` exists and is a directory (or a file)."""
  target = pathlib.Path(path).expanduser()
  if not target.exists():
    raise UsageError(f"{flag} {path} does not exist")
  if directory and not target.is_dir():
    raise UsageError(f"{flag} {path} is a file; a directory is needed")
  if not directory and not target.is_file():
    raise UsageError(f"{flag} {path} is not a file")
