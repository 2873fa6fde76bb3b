"""Test setup: 8 simulated CPU devices and one compilation cache, set before jax is imported.

Most of the suite's time is XLA compiling tiny programs, and many tests compile the same program
anew (each run of a trainer builds new jitted closures). A persistent compilation cache shared by
the whole session (and by its pytest-xdist workers, which inherit the environment) compiles each
program once. It lives in a fresh temporary directory, so every session starts cold and
measures honestly; FUNDAX_TEST_JAX_CACHE names a directory to keep it between sessions.
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
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


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook; without xdist it is never called
def pytest_xdist_make_scheduler(config, log):
  """pytest-xdist (`-n auto`, pytest.ini) sends each test module whole to one worker.

  Modules build expensive module-scoped fixtures (trained tiny runs, an AOT compile); split
  over workers, each worker would build them again. `SHARED_WORKER` widens a module's group.
  (xdist's own `--dist loadgroup` cannot be used: it renames node ids, which pytest 9.2 ignores.)
  """
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class ModuleScheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      module = nodeid.split("::", 1)[0]
      return SHARED_WORKER.get(module, module)

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
