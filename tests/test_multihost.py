"""Multi-host data parallelism: 2 processes x 2 CPU devices == 1 process x 4 devices.

The processes talk over loopback only (coordinator bound to 127.0.0.1) with gloo collectives.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from fundax import parallel

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS_DIR, "multihost_worker.py")
REPO = os.path.dirname(TESTS_DIR)
TIMEOUT_S = 300  # jax startup and compilation on 2 shared cores, for 3 processes at once


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(local_devices, **extra):
  env = {k: v for k, v in os.environ.items()
         if k not in (parallel.DISTRIBUTED_ENV, parallel.COORDINATOR_ENV,
                      *parallel.PROCESS_ENVS.values())}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([REPO, TESTS_DIR, env.get("PYTHONPATH", "")]), **extra)
  return env


def _run_all(tmp_path, launches):
  """Starts every (name, env) worker at once, waits, returns name -> result dict."""
  procs = {}
  for name, env in launches:
    log = open(tmp_path / f"{name}.log", "w", encoding="utf-8")
    procs[name] = (subprocess.Popen([sys.executable, WORKER, str(tmp_path / f"{name}.json")],
                                    env=env, stdout=log, stderr=subprocess.STDOUT), log)
  try:
    for name, (proc, log) in procs.items():
      try:
        proc.wait(timeout=TIMEOUT_S)
      finally:
        log.close()
  finally:
    for proc, _ in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for name, (proc, _) in procs.items():
    if proc.returncode != 0:
      tail = (tmp_path / f"{name}.log").read_text()[-3000:]
      pytest.fail(f"worker {name} exited with {proc.returncode}:\n{tail}")
  return {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in procs}


def test_two_processes_match_one(tmp_path):
  port = _free_port()
  address = f"127.0.0.1:{port}"
  launches = [(f"process{i}", _env(2, JAX_COORDINATOR_ADDRESS=address,
                                   JAX_COORDINATOR_BIND_ADDRESS=address,
                                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
              for i in range(2)]
  launches.append(("single", _env(4)))
  results = _run_all(tmp_path, launches)

  single = results["single"]
  assert (single["process_count"], single["device_count"]) == (1, 4)
  for i in range(2):
    result = results[f"process{i}"]
    assert result["process_index"] == i
    assert (result["process_count"], result["device_count"],
            result["local_device_count"]) == (2, 4, 2)
    for mesh in ("dp", "fsdp"):
      np.testing.assert_allclose(result[mesh]["losses"], single[mesh]["losses"], rtol=1e-5)
  # Data parallel: every process holds the whole (replicated) kernel, equal to the reference.
  for i in range(2):
    np.testing.assert_allclose(results[f"process{i}"]["dp"]["kernel_shard0_sum"],
                               single["dp"]["kernel_shard0_sum"], rtol=1e-4)
  # fsdp: the kernel is split over the fsdp axis; each process holds 2 of the 4 device shards.
  for name in ("single", "process0", "process1"):
    assert results[name]["fsdp"]["kernel_spec"] == [None, "fsdp"]
  assert results["process0"]["fsdp"]["kernel_shards"] == 2


def test_process_envs_reach_initialize(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
  monkeypatch.setenv(parallel.COORDINATOR_ENV, "127.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  assert parallel.maybe_initialize_distributed(None)
  assert calls == [{"num_processes": 2, "process_id": 1}]
