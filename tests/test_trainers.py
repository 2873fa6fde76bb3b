"""End-to-end tests of the VAE and LDM trainers on their tiny configs (a few CPU steps)."""

import json
import pathlib

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from fundax import checkpoint
from fundax import configlib
from fundax import sampling
from fundax.trainers import ldm
from fundax.trainers import vae


@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """Each test runs a trainer three times, and each run compiles the same programs anew (new
  closures); a persistent compilation cache for this module compiles them once."""
  saved = {name: getattr(jax.config, name) for name in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
  compilation_cache.reset_cache()
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  compilation_cache.set_cache_dir(str(tmp_path_factory.mktemp("jax_cache")))
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """One phantom_tiny build shared by every run of this module."""
  return str(tmp_path_factory.mktemp("data"))


def tiny_config(name, data_dir, **overrides):
  config = configlib.load_config(f"configs/{name}.py:tiny")
  items = {"data.data_dir": data_dir, **overrides}
  return configlib.apply_overrides(config, [f"{k}={v}" for k, v in items.items()])


def read_metrics(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def check_outputs(workdir, steps):
  workdir = pathlib.Path(workdir)
  records = read_metrics(workdir)
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(1, steps + 1))
  assert all(np.isfinite(r["loss"]) for r in train)
  assert [r["step"] for r in records if r["split"] == "eval"] == [steps]
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  grid = workdir / "samples" / f"step_{steps:07d}.png"
  assert grid.is_file() and grid.stat().st_size > 1000
  assert (workdir / "checkpoints" / str(steps) / "state").is_dir()


def params_of(workdir):
  return sampling.restore_arrays(workdir)["state"]["params"]


def assert_trees_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


def test_vae_trainer_end_to_end_and_resume(data_dir, tmp_path):
  straight, split = tmp_path / "straight", tmp_path / "split"
  vae.run(tiny_config("vae", data_dir, num_steps=4), str(straight))
  check_outputs(straight, 4)
  records = read_metrics(straight)
  # The adversarial terms switch on at disc_start = 2.
  assert [r["adv_active"] for r in records if r["split"] == "train"] == [0, 0, 1, 1]
  # Resume: 2 steps, then the same job to 4 steps, equals the straight 4-step run.
  # Evaluation and grids do not touch the state; leaving them out saves compiles.
  no_hooks = dict(eval_every=0, sample_every=0)
  vae.run(tiny_config("vae", data_dir, num_steps=4, stop_at_step=2, **no_hooks), str(split))
  assert max(r["step"] for r in read_metrics(split)) == 2
  vae.run(tiny_config("vae", data_dir, num_steps=4, **no_hooks), str(split))
  assert [r["step"] for r in read_metrics(split) if r["split"] == "train"] == [1, 2, 3, 4]
  assert_trees_close(params_of(split), params_of(straight))


def test_ldm_trainer_end_to_end_resume_and_pipeline(data_dir, tmp_path):
  straight, split = tmp_path / "straight", tmp_path / "split"
  ldm.run(tiny_config("ldm", data_dir, num_steps=4), str(straight))
  check_outputs(straight, 4)
  no_hooks = {"eval_every": 0, "sample.every": 0}
  ldm.run(tiny_config("ldm", data_dir, num_steps=4, stop_at_step=2, **no_hooks), str(split))
  ldm.run(tiny_config("ldm", data_dir, num_steps=4, **no_hooks), str(split))
  assert_trees_close(params_of(split), params_of(straight))

  # The checkpoint directory alone rebuilds a sampling pipeline.
  pipeline = sampling.load_pipeline(checkpoint.checkpoint_dir(straight))
  assert pipeline.max_length == 8
  images = sampling.sample_prompts(pipeline, ["a left eye with mild retinopathy"],
                                   jax.random.key(0), num_steps=2, guidance_scale=3.0)
  assert images.shape == (1, 32, 32, 3)
  assert np.all(np.abs(images) <= 1.0)
