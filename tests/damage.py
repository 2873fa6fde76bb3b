"""Ways the tests damage a checkpoint step, as a bad disk, copy or transfer would."""

import os
import pathlib


def garble(step_dir) -> pathlib.Path:
  """Flips bytes in the middle of the largest array data file of a step's state.

  The file keeps its size and every metadata file is intact: Orbax restores it without an
  error (with wrong values), so only the content checksums can tell. Returns the file.
  """
  files = [p for p in (pathlib.Path(step_dir) / "state").rglob("*")
           if p.is_file() and p.parent.name == "d"]
  target = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
  target.write_bytes(bytes(data))
  return target


def overwrite(step_dir) -> None:
  """Overwrites the array data of a step with a few bytes, leaving its metadata in place."""
  for root, _, files in os.walk(pathlib.Path(step_dir) / "state"):
    for name in files:
      if name not in ("_METADATA", "commit_success.txt", "_sharding"):
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
