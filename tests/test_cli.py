"""The `fundax` command line end to end on the tiny phantom, and its bad-input behaviour."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fundax import cli


def test_help_lists_subcommands():
  out = subprocess.run([sys.executable, "-m", "fundax.cli", "--help"], capture_output=True,
                       text=True, check=True).stdout
  for command in ("main", "data", "convert", "export", "feedback", "evaluate", "rlhf",
                  "rlhf-ablate", "train", "sample", "score"):
    assert command in out
  out = subprocess.run([sys.executable, "-m", "fundax.cli", "data", "--help"],
                       capture_output=True, text=True, check=True).stdout
  for action in ("build", "preview", "stats"):
    assert action in out


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("main")
  rc = cli.main(["main", "--config", "configs/main.py:tiny", "--workdir", str(workdir),
                 "--config.data.num_train=12", "--config.preview.num_images=6",
                 "--config.data.num_test=8", "--config.stop_after=data"])
  assert rc == 0
  return workdir


def test_main_job_writes_dataset_stats_and_preview(main_run, capsys):
  stats = json.loads((main_run / "data_stats.json").read_text())
  assert stats["build"]["splits"] == {"train": 12, "validation": 8, "test": 8}
  assert stats["stats"]["splits"]["train"]["num_examples"] == 12
  grid = np.asarray(Image.open(main_run / "preview.png"))
  # 6 tiles of 256 px in rows of 4: two rows of images plus captions and a banner.
  assert grid.shape[1] == 4 * 256 and grid.shape[0] > 2 * 256
  # The synthetic stamp is drawn in its red on the first tile.
  red = (grid[..., 0] == 170) & (grid[..., 1] == 0) & (grid[..., 2] == 0)
  assert red.sum() > 100


def test_main_job_rerun_reuses_dataset(main_run):
  before = sorted(p.stat().st_mtime_ns for p in (main_run / "data").rglob("*.array_record*"))
  assert before
  assert cli.main(["main", "--config", "configs/main.py:tiny", "--workdir", str(main_run),
                   "--config.data.num_train=12", "--config.preview.num_images=6",
                   "--config.data.num_test=8", "--config.stop_after=data"]) == 0
  after = sorted(p.stat().st_mtime_ns for p in (main_run / "data").rglob("*.array_record*"))
  assert before == after


def test_data_commands(main_run, tmp_path, capsys):
  data_dir = str(main_run / "data")
  common = ["--config", "configs/data.py:phantom_tiny", "--data-dir", data_dir,
            "--config.data.num_train=12"]
  assert cli.main(["data", "stats", *common]) == 0
  stats = json.loads(capsys.readouterr().out)
  assert stats["splits"]["validation"]["num_examples"] == 8
  out = tmp_path / "grid.png"
  assert cli.main(["data", "preview", *common, "--out", str(out), "--num-images", "3"]) == 0
  assert Image.open(out).size[0] == 3 * 256


@pytest.mark.parametrize("args,message", [
    (["--config.data.resolutin=3"], "no field 'data.resolutin'"),
    (["--config.data.resolution=big"], "data.resolution=big"),
    (["--config", "configs/missing.py"], "configs/missing.py"),
])
def test_bad_config_fails_before_work(tmp_path, capsys, args, message):
  workdir = tmp_path / "w"
  rc = cli.main(["main", "--workdir", str(workdir), *args])
  assert rc == 2
  assert message in capsys.readouterr().err
  assert not workdir.exists()


def test_stats_on_unbuilt_dataset_names_it(tmp_path, capsys):
  rc = cli.main(["data", "stats", "--config", "configs/data.py:phantom_tiny",
                 "--data-dir", str(tmp_path)])
  assert rc == 2
  assert "not built" in capsys.readouterr().err


def test_feedback_commands_end_to_end(tmp_path, capsys):
  db = str(tmp_path / "ratings.sqlite")
  run = tmp_path / "runs" / "demo"
  assert cli.main(["feedback", "demo-run", str(run), "--num-prompts", "2",
                   "--per-prompt", "2"]) == 0
  assert cli.main(["feedback", "import", str(run), "--db", db]) == 0
  assert "imported 4 new candidates" in capsys.readouterr().out
  assert cli.main(["feedback", "import", str(run), "--db", db]) == 0  # idempotent
  assert "imported 0 new candidates" in capsys.readouterr().out
  assert cli.main(["feedback", "add-rater", "dr_a", "--db", db, "--admin"]) == 0
  assert "token" in capsys.readouterr().out
  assert cli.main(["feedback", "simulate", "--db", db]) == 0
  out = tmp_path / "ratings.jsonl"
  assert cli.main(["feedback", "export", "--db", db, "--out", str(out)]) == 0
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  ratings = [r for r in lines if r.get("kind") == "rating"]
  assert ratings and all(r["simulated"] for r in ratings)
  assert cli.main(["feedback", "export", "--db", db, "--out", str(out), "--humans-only"]) == 0
  assert out.read_text() == ""


def test_feedback_import_missing_run_is_named(tmp_path, capsys):
  assert cli.main(["feedback", "import", str(tmp_path / "nothere"),
                   "--db", str(tmp_path / "r.sqlite")]) == 2
  assert "nothere" in capsys.readouterr().err


def test_aot_rejects_a_malformed_topology(capsys):
  assert cli.main(["aot", "--config", "configs/ldm.py:tiny", "--topology", "v5e-16"]) == 2
  assert "GENERATION:GRID" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["rlhf", "rlhf-ablate"])
def test_rlhf_without_checkpoints_fails_before_work(tmp_path, capsys, command):
  workdir = tmp_path / "w"
  assert cli.main([command, "--config", "configs/rlhf.py:tiny", "--workdir", str(workdir),
                   "--config.rollout.eta=0.0"]) == 2
  err = capsys.readouterr().err
  assert "ldm_checkpoint is empty" in err and "rollout.eta must be > 0" in err
  assert not workdir.exists()


@pytest.mark.parametrize("job,args,message", [
    ("ldm", ["--config.batch_size=0"], "batch_size 0 is not a positive multiple of the"),
    ("ldm", ["--config.sample.sampler=euler"], "sample.sampler must be one of"),
    ("vae", ["--config.resolution=33"], "downsampling factor 2"),
    ("vae", ["--config.nope=1"], "no field 'nope'"),
])
def test_train_bad_config_exits_2_before_work(tmp_path, capsys, job, args, message):
  workdir = tmp_path / "w"
  rc = cli.main(["train", job, "--config", f"configs/{job}.py:tiny", "--workdir", str(workdir),
                 *args])
  assert rc == 2
  assert message in capsys.readouterr().err
  assert not workdir.exists()


def test_sample_and_score_missing_checkpoints_are_named(tmp_path, capsys):
  assert cli.main(["sample", "--checkpoint", str(tmp_path / "noldm"), "--prompt", "x",
                   "--out", str(tmp_path / "g.png")]) == 2
  assert "noldm" in capsys.readouterr().err
  image = tmp_path / "a.png"
  Image.new("RGB", (8, 8)).save(image)
  assert cli.main(["score", "--checkpoint", str(tmp_path / "nosel"), str(image)]) == 2
  assert "nosel" in capsys.readouterr().err
