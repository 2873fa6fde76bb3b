"""Shared helpers of the feedback tests: a small phantom database and a live uvicorn server."""

import contextlib
import socket
import threading
import time

import uvicorn

from fundax.feedback import importer
from fundax.feedback import store as store_lib


def make_store(tmp_path, *, num_prompts=2, per_prompt=3, resolution=64):
  """A SQLite store with one imported phantom run; returns (store, run_dir)."""
  run_dir = importer.write_phantom_run(tmp_path / "media" / "run1", num_prompts=num_prompts,
                                       per_prompt=per_prompt, resolution=resolution)
  store = store_lib.Store(str(tmp_path / "ratings.db"))
  importer.import_run(run_dir, store)
  return store, run_dir


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app):
  """Serves `app` with uvicorn on 127.0.0.1 in a thread; yields the base URL."""
  port = free_port()
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                         limit_concurrency=200))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 20
  while not server.started:
    if time.monotonic() > deadline or not thread.is_alive():
      raise RuntimeError("uvicorn did not start")
    time.sleep(0.02)
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.should_exit = True
    thread.join(10)
