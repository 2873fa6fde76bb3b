"""Metrics of a training run on disk: JSON lines and TensorBoard scalar event files.

This module owns `MetricWriter`, which every trainer uses to record scalars:

  * `<workdir>/metrics.jsonl`: one JSON object per write, `{"step", "split", "time", ...}`.
    A resumed run first drops the records past the step it resumes from, so the file never
    holds the same step twice for a split (nothing is lost: those steps are computed again).
  * `<workdir>/tensorboard/events.out.tfevents.*`: TensorBoard scalars tagged
    `<split>/<name>`, written by tensorboardX (its Event protos and TFRecord framing; TensorFlow
    is not a fundax dependency). tensorboardX's synchronous `EventsWriter` is used rather than
    its `SummaryWriter`, whose `flush()` leaves events queued for a background thread: here
    every write is on disk when `write` returns, as the JSONL record is. A resumed run's file
    starts with a purge marker at the resume step, so TensorBoard hides the earlier files'
    records of the steps computed again.

Only process 0 writes (in multi-host runs every process computes the same replicated metrics).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import pathlib
import time
from collections.abc import Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_WRITER_IDS = itertools.count()  # event files are opened "wb": one name per writer


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
      (they belong to work after the last checkpoint and will be written again), and
      TensorBoard is told to hide the older event files' records past it.
  """

  def __init__(self, workdir: str | os.PathLike, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    workdir = pathlib.Path(workdir)
    self.jsonl_path = workdir / METRICS_FILE
    self.tensorboard_dir = workdir / TENSORBOARD_DIR
    if not self.enabled:
      return
    # Imported here: tensorboardX imports torch when it is installed (a second or more).
    # pylint: disable=g-import-not-at-top
    from tensorboardX import event_file_writer
    from tensorboardX import summary
    from tensorboardX.proto import event_pb2
    from tensorboardX.proto import summary_pb2
    self._summary, self._event_pb2, self._summary_pb2 = summary, event_pb2, summary_pb2
    workdir.mkdir(parents=True, exist_ok=True)
    self._truncate_after(resume_step)
    self.tensorboard_dir.mkdir(exist_ok=True)
    self._events = event_file_writer.EventsWriter(
        str(self.tensorboard_dir / "events"), f".{os.getpid()}.{next(_WRITER_IDS)}")
    self._events.write_event(event_pb2.Event(
        wall_time=time.time(), step=resume_step + 1,
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    self._events.flush()
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
    values = [self._summary.scalar(f"{split}/{name}", value).value[0]
              for name, value in scalars.items()]
    self._events.write_event(self._event_pb2.Event(
        wall_time=now, step=int(step), summary=self._summary_pb2.Summary(value=values)))
    self._events.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._events.close()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
