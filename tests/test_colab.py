"""Every Colab notebook runs top to bottom (code cells, in order, in one namespace).

02_main_job runs on a copy of the session's finished configs/main.py:test run (conftest.py), so
its `main_job.run` cell resumes it (every stage skipped) and the cells after it read real
outputs; training the main job end to end is tests/test_main_job.py's, on that same run.
"""

import json
import pathlib
import shutil

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parent.parent / "colab").glob("*.ipynb"))


def _check_phantom_data(namespace, workdir):
  del workdir
  assert [s.image.shape for s in namespace["samples"]] == [(256, 256, 3)] * 6
  assert namespace["s"].masks["vessels"].any() and namespace["s"].labels.dr_grade == 4
  assert namespace["batch"]["image"].shape == (8, 64, 64, 3)


def _check_main_job(namespace, workdir):
  del namespace
  summary = json.loads((workdir / "main" / "summary.json").read_text())
  assert all(stage["skipped"] for stage in summary["stages"].values()), summary["stages"]


def _check_sampling(namespace, workdir):
  del workdir
  images = np.asarray(namespace["images"])
  assert images.shape[:2] == (2, len(namespace["prompts"])) and images.shape[-1] == 3
  assert np.isfinite(images).all() and np.abs(images).max() <= 1.0 + 1e-6


# What each notebook must leave behind (a notebook without an entry fails the test below).
CHECKS = {"01_phantom_data.ipynb": _check_phantom_data, "02_main_job.ipynb": _check_main_job,
          "03_sampling.ipynb": _check_sampling}


def test_every_notebook_is_checked():
  assert sorted(p.name for p in NOTEBOOKS) == sorted(CHECKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch, tmp_path, request):
  monkeypatch.chdir(path.parent.parent)  # notebooks run from the repository root
  # 02_main_job: the main job's "test" variant (seconds per stage) instead of "tiny".
  monkeypatch.setenv("FUNDAX_DEMO_VARIANT", "test")
  monkeypatch.setenv("FUNDAX_DEMO_WORKDIR", str(tmp_path))
  if path.name == "02_main_job.ipynb":
    _, finished, _ = request.getfixturevalue("main_job_test_run")
    shutil.copytree(finished, tmp_path / "main")  # the notebook's WORKDIR
  cells = json.loads(path.read_text())["cells"]
  namespace = {}
  for i, cell in enumerate(cells):
    if cell["cell_type"] != "code":
      continue
    source = "".join(cell["source"])
    exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)  # pylint: disable=exec-used
  CHECKS[path.name](namespace, tmp_path)
