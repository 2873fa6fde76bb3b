"""End-to-end tests of the VAE and LDM trainers on their tiny configs (a few CPU steps).

One full run per trainer (module-scoped, through the `fundax train` CLI for the LDM, which
trains on the frozen cache) is shared by every test: its outputs, resume equivalence (4 steps ==
2 steps, a SIGTERM, a restore and 2 steps, the second part reusing the first's cache) and
`fundax sample` on its checkpoint.
"""

import json
import os
import pathlib
import signal

import jax
import numpy as np
import pytest
from PIL import Image

from fundax import checkpoint
from fundax import cli
from fundax import configlib
from fundax.train import frozen_cache
from fundax.train import loop
from fundax.trainers import ldm
from fundax.trainers import vae


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """One phantom_tiny build shared by every run of this module."""
  return str(tmp_path_factory.mktemp("data"))


# The LDM runs a one-level UNet: what these tests check is the trainer (outputs, resume,
# sampling from its checkpoint), and the module took 175 s alone against 213 s with the tiny
# config's two levels (tests/test_conditioning.py trains a two-level UNet). It trains on the
# frozen cache, the default of every config but the tiny one; encoding in every step is the
# main job's test variant's (tests/test_main_job.py).
LDM = {"unet.block_out_channels": "(32,)", "unet.cross_attention": "(True,)",
       "cache.enabled": "True"}


def overrides(data_dir, name, **items):
  ldm_items = LDM if name == "ldm" else {}
  return [f"{k}={v}" for k, v in {"data.data_dir": data_dir, **ldm_items, **items}.items()]


def tiny_config(name, data_dir, **items):
  config = configlib.load_config(f"configs/{name}.py:tiny")
  return configlib.apply_overrides(config, overrides(data_dir, name, **items))


def read_metrics(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def check_outputs(workdir, steps):
  workdir = pathlib.Path(workdir)
  records = read_metrics(workdir)
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(1, steps + 1))
  assert all(np.isfinite(r["loss"]) for r in train)
  assert all(r["nonfinite"] == 0 and r["nonfinite_total"] == 0 for r in train)
  assert [r["step"] for r in records if r["split"] == "eval"] == [steps]
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  grid = workdir / "samples" / f"step_{steps:07d}.png"
  assert grid.is_file() and grid.stat().st_size > 1000
  assert (workdir / "checkpoints" / str(steps) / "state").is_dir()


def params_of(workdir):
  return checkpoint.restore_params(workdir)["state"]["params"]


def assert_trees_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


@pytest.fixture(scope="module")
def vae_run(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("vae")
  vae.run(tiny_config("vae", data_dir, num_steps=4), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def ldm_run(data_dir, tmp_path_factory):
  """The tiny LDM trained for 4 steps by `fundax train ldm`."""
  workdir = tmp_path_factory.mktemp("ldm")
  args = ["train", "ldm", "--config", "configs/ldm.py:tiny", "--workdir", str(workdir)]
  assert cli.main(args + [f"--config.{o}" for o in overrides(data_dir, "ldm", num_steps=4)]) == 0
  return workdir


def test_vae_trainer_outputs(vae_run):
  check_outputs(vae_run, 4)
  # The adversarial terms switch on at disc_start = 2.
  assert [r["adv_active"] for r in read_metrics(vae_run) if r["split"] == "train"] == [0, 0, 1, 1]


def test_ldm_trainer_outputs(ldm_run):
  check_outputs(ldm_run, 4)


@pytest.mark.parametrize("name", ["vae", "ldm"])
def test_sigterm_saves_and_resume_equals_straight_run(name, request, data_dir, tmp_path,
                                                      monkeypatch, caplog):
  """SIGTERM during step 1 (as a preempted VM gets it): step 2 is saved, the run returns
  cleanly, and rerunning the command continues to step 4 exactly like the straight run; the
  LDM's first part builds the frozen cache and the second finds it instead of encoding again.
  (Evaluation and grids do not touch the state; leaving them out saves compiles.)"""
  trainer, straight = {"vae": (vae, "vae_run"), "ldm": (ldm, "ldm_run")}[name]
  straight = request.getfixturevalue(straight)
  original = loop.train_loop

  def preempted_loop(*args, hooks=(), **kwargs):
    def sigterm(step, state):
      del state
      if step == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, hooks=[*hooks, loop.Hook(1, sigterm)], **kwargs)

  # No periodic checkpoint before step 4: the step-2 checkpoint can only come from SIGTERM.
  no_hooks = {"eval_every": 0, "checkpoint_every": 4,
              "sample_every" if name == "vae" else "sample.every": 0}
  with monkeypatch.context() as patch:
    patch.setattr(loop, "train_loop", preempted_loop)
    outputs = trainer.run(tiny_config(name, data_dir, num_steps=4, **no_hooks), str(tmp_path))
  assert "preempted" in outputs["unfinished"]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
  assert max(r["step"] for r in read_metrics(tmp_path)) == 2
  caches = sorted((tmp_path / "cache").glob("*"))  # the LDM's frozen cache; the VAE has none
  assert [(c / frozen_cache.MANIFEST).is_file() for c in caches] == [True] * (name == "ldm")
  with caplog.at_level("INFO", logger="fundax.train.frozen_cache"):
    outputs = trainer.run(tiny_config(name, data_dir, num_steps=4, **no_hooks), str(tmp_path))
  assert "unfinished" not in outputs
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
  assert_trees_close(params_of(tmp_path), params_of(straight))
  assert sorted((tmp_path / "cache").glob("*")) == caches  # found again, not built anew
  found = [r for r in caplog.records
           if r.name == "fundax.train.frozen_cache" and "found" in r.getMessage()]
  assert len(found) == (name == "ldm")


def test_cli_sample_from_the_checkpoint_alone(ldm_run, tmp_path, capsys):
  out = tmp_path / "grid.png"
  rc = cli.main(["sample", "--checkpoint", str(ldm_run / "checkpoints"), "--prompt",
                 "a left eye with mild retinopathy", "--prompt", "", "--num", "2",
                 "--steps", "2", "--guidance", "3", "--seed", "1", "--out", str(out)])
  assert rc == 0
  assert "4 SYNTHETIC images" in capsys.readouterr().out
  grid = np.asarray(Image.open(out))
  # Two rows of two 256 px tiles, a title banner and captions; the red SYNTHETIC stamp.
  assert grid.shape[1] == 2 * 256 and grid.shape[0] > 2 * 256
  red = (grid[..., 0] == 170) & (grid[..., 1] == 0) & (grid[..., 2] == 0)
  assert red.sum() > 100
