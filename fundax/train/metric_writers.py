"""Metrics of a training run on disk: JSON lines and TensorBoard scalar event files.

This module owns `MetricWriter`, which every trainer uses to record scalars:

  * `<workdir>/metrics.jsonl`: one JSON object per write, `{"step", "split", "time", ...}`.
    A resumed run first drops the records past the step it resumes from, so the file never
    holds the same step twice for a split (nothing is lost: those steps are computed again).
  * `<workdir>/tensorboard/events.out.tfevents.*`: TensorBoard's event format, written
    directly. TensorFlow is not a fundax dependency and `flax.metrics.tensorboard` imports it,
    so the few bytes of the format are encoded here: each record is
    `len (u64) | masked crc32c(len) (u32) | Event proto | masked crc32c(proto) (u32)`, and the
    Event / Summary.Value protos (scalars only) are hand-encoded in protobuf wire format.

Only process 0 writes (in multi-host runs every process computes the same replicated metrics).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import struct
import time
from collections.abc import Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`, as TFRecord framing uses."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15 and add a constant (mod 2^32)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  value &= (1 << 64) - 1  # negative int64s are ten-byte two's complement varints
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  return _varint((number << 3) | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
  return _field(number, 2, _varint(len(payload)) + payload)


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
  """A serialised tensorflow.Event: wall_time=1, step=2, file_version=3, summary=5.

  Summary.value=1 holds Summary.Value messages with tag=1 and simple_value=2 (float32).
  """
  event = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    event += _length_delimited(3, file_version.encode())
  if scalars:
    values = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) +
                          _field(2, 5, struct.pack("<f", float(value))))
        for tag, value in scalars.items())
    event += _length_delimited(5, values)
  return event


def encode_record(data: bytes) -> bytes:
  """TFRecord framing of one serialised proto."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data +
          struct.pack("<I", masked_crc32c(data)))


def _scalars(metrics: Mapping[str, object]) -> dict[str, float]:
  out = {}
  for name, value in metrics.items():
    array = np.asarray(value)
    if array.size == 1 and np.issubdtype(array.dtype, np.number):
      out[name] = float(array.reshape(()))
  return out


class MetricWriter:
  """Writes scalar metrics to metrics.jsonl and a TensorBoard event file (process 0 only).

  Args:
    workdir: the run's output directory.
    resume_step: the step the run starts from; JSONL records with a larger step are dropped
      (they belong to work after the last checkpoint and will be written again).
  """

  def __init__(self, workdir: str | os.PathLike, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    workdir = pathlib.Path(workdir)
    self.jsonl_path = workdir / METRICS_FILE
    self.events_path = None
    if not self.enabled:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    self._truncate_after(resume_step)
    tb_dir = workdir / TENSORBOARD_DIR
    tb_dir.mkdir(exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
    self.events_path = tb_dir / name
    self._events = open(self.events_path, "ab")
    self._events.write(encode_record(encode_event(now, 0, file_version="brain.Event:2")))
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")

  def _truncate_after(self, step: int) -> None:
    if not self.jsonl_path.exists():
      return
    lines = self.jsonl_path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
      log.info("dropping %d metric records past step %d from %s", len(lines) - len(kept), step,
               self.jsonl_path)
      self.jsonl_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

  def write(self, step: int, metrics: Mapping[str, object], split: str = "train") -> None:
    """Records the scalar entries of `metrics` (arrays of one element) at `step`.

    Args:
      step: the training step the metrics belong to.
      metrics: name -> scalar (Python number, numpy or jax array); other entries are skipped.
      split: "train", "eval", ...; the TensorBoard tag is "<split>/<name>".
    """
    if not self.enabled:
      return
    scalars = _scalars(metrics)
    now = time.time()
    record = {"step": int(step), "split": split, "time": now, **scalars}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    tagged = {f"{split}/{name}": value for name, value in scalars.items()}
    self._events.write(encode_record(encode_event(now, int(step), scalars=tagged)))
    self._events.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._events.close()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
