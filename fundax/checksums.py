"""Content checksums of the files a checkpoint step or a params directory holds.

Orbax and TensorStore notice structural damage (a truncated file, broken metadata) but not
changed bytes inside an array file: such a checkpoint restores without an error and yields
wrong (often NaN) weights. So once a step's files are final, fundax records the SHA-256 of
every file of every item beside them, and each read checks the items it reads first:

```
<step or params directory>/checksums.json
  {"format": 1, "algorithm": "sha256",
   "items": {"state": {"manifest.ocdbt": "9f2c...", "d/4bc2...": "..."}, "config": {...}}}
```

An item is a subdirectory (a checkpoint step's `state`, `config`, ...; a params directory's
`params`); file names are relative to it, with "/" separators. A directory without the file
(written before fundax recorded checksums) still reads: `verify` returns False and the caller
warns that it is unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

FILE = "checksums.json"
FORMAT = 1
ALGORITHM = "sha256"


class DamagedError(ValueError):
  """A file differs from its recorded checksum, is missing, or the record is unreadable."""


def _digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, ALGORITHM).hexdigest()


def digest_item(directory: str) -> dict[str, str]:
  """{file path relative to `directory` ("/"-separated): SHA-256 hex digest} of every file."""
  out = {}
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory).replace(os.sep, "/")] = _digest(path)
  return out


def record(directory: str | os.PathLike, items: Iterable[str]) -> None:
  """Writes `directory/checksums.json` for those of `items` that exist as subdirectories.

  Call it only once the items' files are final. The record is written to a temporary file
  and renamed, so a reader never sees half of it.
  """
  directory = os.fspath(directory)
  table = {name: digest_item(os.path.join(directory, name)) for name in items
           if os.path.isdir(os.path.join(directory, name))}
  path = os.path.join(directory, FILE)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump({"format": FORMAT, "algorithm": ALGORITHM, "items": table}, f, indent=1,
              sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


def verify(directory: str | os.PathLike, items: Iterable[str]) -> bool:
  """Checks the named items of `directory` against its record.

  Args:
    directory: a checkpoint step or params directory.
    items: the item subdirectories about to be read.

  Returns:
    True when every file of the items matches; False when the directory has no record
    (unverified: the caller should say so).

  Raises:
    DamagedError: naming the first file that is missing or differs, an item present on disk
      but not recorded, or an unreadable record.
  """
  directory = os.fspath(directory)
  path = os.path.join(directory, FILE)
  if not os.path.exists(path):
    return False
  try:
    with open(path, encoding="utf-8") as f:
      table = json.load(f)["items"]
    if not isinstance(table, dict):
      raise TypeError("'items' is not an object")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DamagedError(f"its checksum record {path} is unreadable ({e})") from e
  for name in items:
    item_dir = os.path.join(directory, name)
    if name not in table:
      if os.path.isdir(item_dir):
        raise DamagedError(f"{item_dir} is not in its checksum record {path}")
      continue
    for relative, digest in table[name].items():
      file = os.path.join(item_dir, *relative.split("/"))
      if not os.path.isfile(file):
        raise DamagedError(f"{file} is missing")
      if _digest(file) != digest:
        raise DamagedError(f"{file} differs from its recorded checksum")
  return True
