"""The main job end to end on configs/main.py:test: every stage's outputs, resume, bad config."""

import json

import numpy as np
import pytest
from PIL import Image

from fundax import configlib
from fundax.data import captions
from fundax.data import labels as labels_lib
from fundax.trainers import main_job

STAGE_NAMES = ["data", "vae", "ldm", "grids", "evaluator", "selector", "rlhf", "report"]


def _config(*overrides):
  config = configlib.load_config("configs/main.py:test")
  return configlib.apply_overrides(config, list(overrides))


@pytest.fixture
def job(main_job_test_run):
  return main_job_test_run  # conftest.py: one configs/main.py:test run per session


def _tiles(path):
  """(height, width, channels) of a grid sheet written by loop.save_grid (128 px tiles)."""
  return np.asarray(Image.open(path)).shape


def test_every_stage_ran_and_summary_has_times(job):
  config, workdir, outputs = job
  summary = json.loads((workdir / "summary.json").read_text())
  assert list(summary["stages"]) == STAGE_NAMES == [s.name for s in main_job.STAGES]
  for name, record in summary["stages"].items():
    assert record["seconds"] > 0 and record["cpu_seconds"] > 0, name
    assert not record["skipped"]
    assert (workdir / "stages" / f"{name}.json").exists()
  assert summary["seconds_all_stages"] == pytest.approx(
      sum(r["seconds"] for r in summary["stages"].values()))
  assert outputs["summary"] == str(workdir / "summary.json")
  metrics = summary["metrics"]
  assert np.isfinite(metrics["ldm_train_loss"]) and "psnr" in " ".join(metrics["vae_eval"])
  assert any(name.startswith("consistency: dr_grade accuracy") for name in metrics["report"])
  fd = metrics["report"]["Fréchet distance (evaluator features)"]
  assert set(fd) == {"generated", "phantoms", "control"}  # every figure beside its references


def test_trainers_wrote_checkpoints_on_one_dataset(job):
  config, workdir, _ = job
  for name in ("vae", "ldm"):
    steps = [p.name for p in (workdir / name / "checkpoints").iterdir() if p.name.isdigit()]
    assert str(config[name].num_steps) in steps
  # Both trainers read the dataset the data stage built, not one of their own.
  assert not (workdir / "vae" / "data").exists() and not (workdir / "ldm" / "data").exists()
  record = json.loads((workdir / "stages" / "ldm.json").read_text())
  assert record["config"]["ldm"]["num_steps"] == config.ldm.num_steps  # settings recorded


def test_grids_per_grade_and_eye(job):
  config, workdir, _ = job
  g = config.grids
  for grade in g.grades:
    for eye in labels_lib.LATERALITIES:
      height, width, _ = _tiles(workdir / "grids" / f"dr{grade}_{eye}.png")
      assert width == min(4, g.tiles) * 128 and height > 128  # one row of 128 px tiles
  height, width, _ = _tiles(workdir / "grids" / "overview.png")
  assert width == len(g.grades) * 128 and height > 2 * 128  # a row per eye


def test_grid_prompts_state_grade_and_eye():
  for grade in range(5):
    for eye in labels_lib.LATERALITIES:
      prompts = main_job.grid_prompts(grade, eye, 4, 7)
      assert len(set(prompts)) == 4
      for prompt in prompts:
        parsed = captions.parse_caption(prompt)
        assert (parsed.dr_grade, parsed.laterality) == (grade, eye), prompt


def test_report_names_metrics_and_selector(job):
  config, workdir, _ = job
  html = (workdir / "report" / "report.html").read_text(encoding="utf-8")
  for name in ("Fréchet distance", "KID", "MS-SSIM", "consistency", "Selector", "C2ST",
               "negative control", "held-out phantoms"):
    assert name in html
  metrics = json.loads((workdir / "report" / "metrics.json").read_text())
  r = config.report
  assert metrics["num_images"] == r.num_prompts * r.samples_per_prompt
  assert len(metrics["selector"]["scores"]) == metrics["num_images"]
  assert all(0 <= s <= 1 for s in metrics["selector"]["scores"])
  assert len(list((workdir / "report" / "samples").glob("*.png"))) == metrics["num_images"]


def test_rlhf_rounds_ran_from_the_earlier_stages(job):
  config, workdir, outputs = job
  record = json.loads((workdir / "stages" / "rlhf.json").read_text())["outputs"]
  assert record["rounds_done"] == config.rlhf.num_rounds
  rows = [json.loads(line) for line in
          (workdir / "rlhf" / "metrics.jsonl").read_text().splitlines()]
  assert {row["split"] for row in rows} == {"heldout", "stage1", "stage2"}
  # Round 0 (the LDM stage's model) and every round after it were judged by the evaluator.
  report = json.loads((workdir / "rlhf" / "report" / "report.json").read_text())
  assert [h["round"] for h in report["history"]] == list(range(config.rlhf.num_rounds + 1))
  assert report["selector"]["path"] == str(workdir / "selector")
  # The simulated raters' ratings of the candidates are in the rating store.
  assert (workdir / "rlhf" / "feedback" / "ratings.sqlite").stat().st_size > 0
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["metrics"]["rlhf"]["rounds_done"] == config.rlhf.num_rounds
  kept = report["history"][record["best_round"]]  # the summary's "kept" figures are that round's
  assert summary["metrics"]["rlhf"]["reward_kept"] == pytest.approx(kept["reward"])
  assert summary["metrics"]["rlhf"]["composite_kept"] == pytest.approx(kept["composite"])
  assert outputs["rlhf best_checkpoint"] == str(workdir / "rlhf" / "best")


def test_report_samples_the_kept_model_and_shows_rlhf(job):
  _, workdir, _ = job
  record = json.loads((workdir / "stages" / "report.json").read_text())["outputs"]
  assert record["model"] == str(workdir / "rlhf" / "best")
  html = (workdir / "report" / "report.html").read_text(encoding="utf-8")
  for text in ("RLHF", "before RLHF (round 0)", "Selector reward", "held-out composite"):
    assert text in html, text


def test_rerun_skips_finished_stages(job):
  config, workdir, _ = job
  grid = workdir / "grids" / "overview.png"
  before = grid.stat().st_mtime_ns
  main_job.run(config, str(workdir))
  summary = json.loads((workdir / "summary.json").read_text())
  assert all(record["skipped"] for record in summary["stages"].values())
  assert grid.stat().st_mtime_ns == before


def test_interrupted_training_resumes(tmp_path):
  config = _config("stop_after=ldm", "vae.num_steps=4", "vae.stop_at_step=2")
  outputs = main_job.run(config, str(tmp_path))
  # The VAE stopped at step 2 of 4 (as SIGTERM stops it): not marked finished, no LDM on it.
  assert "stage vae unfinished: stopped at step 2 of 4" in outputs["stopped"]
  assert not (tmp_path / "stages" / "vae.json").exists() and not (tmp_path / "ldm").exists()
  configlib.apply_overrides(config, ["vae.stop_at_step=0", "stop_after=vae"])
  main_job.run(config, str(tmp_path))
  rows = [json.loads(line) for line in (tmp_path / "vae" / "metrics.jsonl").read_text().split("\n")
          if line]
  steps = [row["step"] for row in rows if row["split"] == "train"]
  assert steps == [1, 2, 3, 4]  # steps 1-2 from the first run, 3-4 resumed, none repeated
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert list(summary["stages"]) == ["data", "vae"] and summary["stages"]["data"]["skipped"]


@pytest.mark.parametrize("override,message", [
    ("stop_after=rl", "not a stage"),
    ("rlhf.rollout.eta=0.0", "eta must be > 0"),
    ("rlhf.rollout.candidates_per_prompt=1", "candidates_per_prompt must be >= 2"),
    ("rlhf.stage1.advantage_fallback=median", "advantage_fallback must be one of"),
    ("resolution=66", "must be a multiple of"),
    ("vae.batch_size=0", "invalid VAE config"),
    ("grids.grades=(2, 5)", "DR grades 0-4"),
    ("report.samples_per_prompt=0", "at least 1"),
])
def test_bad_config_fails_before_compute(tmp_path, override, message):
  with pytest.raises(ValueError, match=message):
    main_job.run(_config(override), str(tmp_path))
  assert not (tmp_path / "data").exists()
