"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
