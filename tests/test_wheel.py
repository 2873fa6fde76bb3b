"""The package as a user installs it: the wheel, outside the checkout, without extras.

The wheel is built from a copy of the sources (an in-tree build would write build/ into the
checkout) and installed with `pip install --no-deps --target`: its dependencies are the ones
this environment already has (installing them from the registry takes minutes), and
PYTHONPATH puts the wheel's `fundax` ahead of the editable checkout, which each run asserts.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

# Run by the wheel's interpreter with the web stack hidden, as after `pip install fundax`.
_CHECKS = textwrap.dedent("""
    import contextlib, io, json, sys
    for name in ("fastapi", "uvicorn", "python_multipart"):
      sys.modules[name] = None  # the "web" extra is not installed
    import fundax
    from fundax import cli, configlib, sampling
    from fundax.eval import evaluator, evaluator_train
    from fundax.models import ldm
    from fundax.trainers import main_job
    config = configlib.load_config("main:tiny")
    run_dir, finished = evaluator_train.find_run(config.evaluator, cache="evaluator_cache")
    evaluator.load_evaluator(finished["evaluator_dir"])
    vae_dir = ldm.resolve_vae(config.vae_checkpoint)  # the autoencoder the Quickstart reads
    ldm.load_vae(vae_dir)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      serve_rc = cli.main(["feedback", "serve", "--db", "ratings.db"])
    print(json.dumps({
        "fundax": fundax.__file__, "evaluator": str(run_dir), "vae": vae_dir,
        "serve_rc": serve_rc,
        "configs": [str(p) for p in configlib.shipped_configs().values()],
        "serve_err": err.getvalue()}))
""")


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> pathlib.Path:
  """The directory the wheel was installed into (`--target`), its scripts under bin/."""
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  src.mkdir()
  for name in ("setup.py", "README.md"):
    shutil.copy(REPO / name, src / name)
  for name in ("fundax", "configs"):
    shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
  pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
  subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src],
                 check=True)
  wheel, = (tmp / "dist").glob("fundax-*.whl")
  site = tmp / "site"
  subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel],
                 check=True)
  return site


def test_installed_wheel_works_outside_the_checkout(wheel_site, tmp_path):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(wheel_site)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
  checks = subprocess.run([sys.executable, "-c", _CHECKS], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
  assert checks.returncode == 0, checks.stderr[-3000:]
  facts = json.loads(checks.stdout.strip().splitlines()[-1])
  # The wheel's fundax, configs, shipped evaluator and VAE: nothing read from the checkout.
  for path in [facts["fundax"], facts["evaluator"], facts["vae"], *facts["configs"]]:
    assert pathlib.Path(path).is_relative_to(wheel_site), path
  assert {pathlib.Path(p).stem for p in facts["configs"]} >= {"main", "data", "evaluator", "rlhf"}
  # sampling and the main job imported without the web stack; serving names the extra.
  assert facts["serve_rc"] == 2
  assert facts["serve_err"].strip().endswith('pip install "fundax[web]"'), facts["serve_err"]

  # The console script, with a shipped config by name, from a directory outside the repo: the
  # main job's first stage (the whole job takes minutes; the evaluator was loaded above).
  workdir = tmp_path / "run"
  run = subprocess.run([wheel_site / "bin" / "fundax", "main", "--config", "main:test",
                        "--config.stop_after=data", "--workdir", workdir],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"data preview: {workdir / 'preview.png'}" in run.stdout
  assert json.loads((workdir / "stages" / "data.json").read_text())
