"""Test setup: simulated CPU devices, XLA's optimisation level and one compilation cache, set
before jax is imported.

Most of the suite's time is XLA compiling tiny programs, and many tests compile the same program
anew (each run of a trainer builds new jitted closures). A persistent compilation cache shared by
the whole session (and by its pytest-xdist workers, which inherit the environment) compiles each
program once. It lives in a fresh temporary directory, so every session starts cold and
measures honestly; FUNDAX_TEST_JAX_CACHE names a directory to keep it between sessions.

Devices: the modules in `SHARDED` test sharding and run on 8 simulated devices; every other
module runs on one, because compiling and running a program for 8 simulated devices on a small
host costs about 1.5x and tests nothing there. Under pytest-xdist with two or more workers,
worker gw0 has 8 devices and runs the `SHARDED` modules only, the other workers have one device
and run the rest (`pytest_xdist_make_scheduler`); `-n auto` adds gw0 to one worker per core. In a
single process (`-n 0`) every test sees 8 devices, the setting the suite was first written for.
"""

import atexit
import collections
import json
import os
import shutil
import tempfile

import pytest

# Test modules about sharding (meshes over several devices, per-device batch checks).
SHARDED = frozenset(f"tests/{name}.py" for name in (
    "test_checkpoint", "test_loop", "test_lowering", "test_parallel", "test_params_io",
    "test_pipeline", "test_sharding"))
SHARDED_DEVICES = 8
# LLVM optimisation level of XLA:CPU's generated code (XLA's default is 2). The suite's programs
# are small, so compiling them is most of its time: at level 1 the UNet tests took 181 s of CPU
# against 243 s at 2, the RLHF loop tests 336 s against 390, the conditioning test 109 s against
# 155 (one simulated device, 2 cores, 2026-12-07). Level 0 compiles faster still but runs the
# RLHF loop's many sampling steps 50% slower (595 s).
OPTIMIZATION_LEVEL = 1


def _devices() -> int:
  """This process's simulated device count (see the module docstring)."""
  worker = os.environ.get("PYTEST_XDIST_WORKER")
  workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
  return SHARDED_DEVICES if worker in (None, "gw0") or workers < 2 else 1


_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
if not any("backend_optimization_level" in f for f in _flags):
  _flags.append(f"--xla_backend_optimization_level={OPTIMIZATION_LEVEL}")
os.environ["XLA_FLAGS"] = " ".join(  # a worker's count replaces the one it inherits
    _flags + [f"--xla_force_host_platform_device_count={_devices()}"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  if os.environ.get("FUNDAX_TEST_JAX_CACHE"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["FUNDAX_TEST_JAX_CACHE"]
  else:  # the controller process: workers find the variable set and share its directory
    _cache = tempfile.mkdtemp(prefix="fundax-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


# Test files that share a session fixture, so one worker runs them all (and it is built once).
SHARED_WORKER = {"tests/test_main_job.py": "main_job", "tests/test_colab.py": "main_job"}


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # a pytest-xdist hook
def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker per core for the one-device modules, plus gw0 for `SHARDED`."""
  del config
  if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
    return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
  cores = len(os.sched_getaffinity(0))
  return cores + 1 if cores > 1 else 1


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook; without xdist it is never called
def pytest_xdist_make_scheduler(config, log):
  """pytest-xdist (`-n auto`, pytest.ini) sends each test module whole to one worker.

  Modules build expensive module-scoped fixtures (trained tiny runs, an AOT compile); split
  over workers, each worker would build them again. `SHARED_WORKER` widens a module's group.
  With two or more workers the `SHARDED` modules go to gw0 (8 devices) and only there, every
  other module to the one-device workers; a worker gets its next module when it is down to its
  last test (xdist's own threshold is two tests, which can queue a long module behind a long
  test while another worker idles).
  (xdist's own `--dist loadgroup` cannot be used: it renames node ids, which pytest 9.2 ignores.)
  """
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class ModuleScheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      module = nodeid.split("::", 1)[0]
      return SHARED_WORKER.get(module, module)

    def _runs_here(self, node, scope):
      if len(self.nodes) < 2:
        return True
      return (scope in SHARDED) == (node.workerinput["workerid"] == "gw0")

    def _reschedule(self, node):
      if node.shutting_down:
        return
      if not self.workqueue:
        node.shutdown()
      elif self._pending_of(self.assigned_work[node]) <= 1:
        self._assign_work_unit(node)

    def _assign_work_unit(self, node):
      scopes = [s for s in self.workqueue if self._runs_here(node, s)]
      if not scopes:  # nothing left this worker may run
        node.shutdown()
        return
      scope = scopes[0]  # xdist's order: modules with the most tests first
      work_unit = self.workqueue.pop(scope)
      self.assigned_work.setdefault(node, {})[scope] = work_unit
      collection = self.registered_collections[node]
      node.send_runtest_some([collection.index(nodeid)
                              for nodeid, done in work_unit.items() if not done])

  return ModuleScheduling(config, log)


@pytest.fixture(scope="session")
def main_job_test_run(tmp_path_factory):
  """configs/main.py:test run once per session: (config, workdir, outputs).

  Every stage of the main job takes seconds at this size but the whole run takes minutes, so
  the main-job tests and the demo notebook's test share one run.
  """
  from fundax import configlib  # pylint: disable=g-import-not-at-top
  from fundax.trainers import main_job  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("main_job")
  config = configlib.load_config("configs/main.py:test")
  return config, workdir, main_job.run(config, str(workdir))


# Where the suite's time goes: seconds of XLA compiling (persistent-cache hits included) and
# compiles per test module, summed over the workers and printed after the run.
# FUNDAX_TEST_COMPILE_LOG names a file that also gets one JSON line per compile (test, function,
# seconds), to find the programs worth sharing.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = collections.defaultdict(lambda: [0.0, 0])  # module -> [seconds, compiles]
_running = {"nodeid": "(collection)"}


def _record_compile(event, duration, **kwargs):
  if event != _COMPILE_EVENT:
    return
  nodeid = _running["nodeid"]
  entry = _compiles[nodeid.split("::", 1)[0]]
  entry[0] += duration
  entry[1] += 1
  if os.environ.get("FUNDAX_TEST_COMPILE_LOG"):
    with open(os.environ["FUNDAX_TEST_COMPILE_LOG"], "a", encoding="utf-8") as f:
      f.write(json.dumps({"test": nodeid, "fun": kwargs.get("fun_name"), "s": duration}) + "\n")


def pytest_configure(config):
  del config
  from jax import monitoring  # pylint: disable=g-import-not-at-top
  monitoring.register_event_duration_secs_listener(_record_compile)


def pytest_runtest_logstart(nodeid, location):
  del location
  _running["nodeid"] = nodeid


def pytest_sessionfinish(session):
  if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: hand them to the controller
    session.config.workeroutput["compiles"] = dict(_compiles)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook, on the controller
def pytest_testnodedown(node, error):
  del error
  for module, (seconds, count) in getattr(node, "workeroutput", {}).get("compiles", {}).items():
    _compiles[module][0] += seconds
    _compiles[module][1] += count


def pytest_terminal_summary(terminalreporter):
  if not _compiles:
    return
  total = sum(s for s, _ in _compiles.values())
  terminalreporter.write_sep("=", f"XLA compiling: {total:.0f} s in "
                             f"{sum(n for _, n in _compiles.values())} compiles; top modules")
  for module, (seconds, count) in sorted(_compiles.items(), key=lambda kv: -kv[1][0])[:15]:
    terminalreporter.write_line(f"{seconds:8.1f} s {count:5d} compiles  {module}")
