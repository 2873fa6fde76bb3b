"""Every Colab notebook runs top to bottom (code cells, in order, in one namespace)."""

import json
import pathlib

import matplotlib
import pytest

matplotlib.use("Agg")

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parent.parent / "colab").glob("*.ipynb"))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch, tmp_path):
  monkeypatch.chdir(path.parent.parent)  # notebooks run from the repository root
  # 02_main_job: the main job's "test" variant (seconds per stage) instead of "tiny".
  monkeypatch.setenv("FUNDAX_DEMO_VARIANT", "test")
  monkeypatch.setenv("FUNDAX_DEMO_WORKDIR", str(tmp_path))
  cells = json.loads(path.read_text())["cells"]
  namespace = {}
  for i, cell in enumerate(cells):
    if cell["cell_type"] != "code":
      continue
    source = "".join(cell["source"])
    exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)  # pylint: disable=exec-used
