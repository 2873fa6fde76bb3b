"""The main job end to end on configs/main.py:test: every stage's outputs, resume, bad config;
its typed stage results through JSON, its report going through `fundax evaluate`'s function,
and bench/compute_study.py reading its targets from that report.
"""

import dataclasses
import importlib.util
import json
import re

import numpy as np
import pytest
from PIL import Image

from fundax import configlib
from fundax.data import captions
from fundax.data import labels as labels_lib
from fundax.eval import run as eval_run
from fundax.models import ldm as ldm_lib
from fundax.trainers import main_job
from fundax.trainers import stage_results as sr

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
  # Written by `fundax evaluate`'s function, which states what it generated from.
  assert metrics["num_reference"] == min(r.num_reference, config.data.num_train)
  assert metrics["note"].startswith(
      f"{metrics['num_images']} images generated from {workdir / 'rlhf' / 'best'} for "
      f"{r.num_prompts} prompts, against {metrics['num_reference']} reference images; TSTR "
      f"tested on {config.data.num_test} held-out images.")
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
  config, workdir, outputs = job
  grid = workdir / "grids" / "overview.png"
  before = grid.stat().st_mtime_ns
  metrics = json.loads((workdir / "summary.json").read_text())["metrics"]
  # The results read back from the stage files give the same outputs and key metrics.
  assert main_job.run(config, str(workdir)) == outputs
  summary = json.loads((workdir / "summary.json").read_text())
  assert all(record["skipped"] for record in summary["stages"].values())
  assert json.dumps(summary["metrics"]) == json.dumps(metrics)  # NaN != NaN: compare the text
  assert grid.stat().st_mtime_ns == before


def test_interrupted_training_resumes(tmp_path):
  # The VAE of the session's main:test run (same steps: its compiled programs are reused).
  config = _config("stop_after=ldm", "vae.stop_at_step=1")
  outputs = main_job.run(config, str(tmp_path))
  # The VAE stopped at step 1 of 2 (as SIGTERM stops it): not marked finished, no LDM on it.
  assert "stage vae unfinished: stopped at step 1 of 2" in outputs["stopped"]
  assert not (tmp_path / "stages" / "vae.json").exists() and not (tmp_path / "ldm").exists()
  configlib.apply_overrides(config, ["vae.stop_at_step=0", "stop_after=vae"])
  main_job.run(config, str(tmp_path))
  rows = [json.loads(line) for line in (tmp_path / "vae" / "metrics.jsonl").read_text().split("\n")
          if line]
  steps = [row["step"] for row in rows if row["split"] == "train"]
  assert steps == [1, 2]  # step 1 from the first run, 2 resumed, none repeated
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert list(summary["stages"]) == ["data", "vae"] and summary["stages"]["data"]["skipped"]


def test_the_vae_stage_measures_a_shipped_vae_instead_of_training(tmp_path):
  config = _config("vae_checkpoint=phantom-64", "stop_after=vae")
  main_job.run(config, str(tmp_path))
  result = sr.TrainResult.from_json(
      json.loads((tmp_path / "stages" / "vae.json").read_text())["outputs"])
  assert result.checkpoints == str(ldm_lib.SHIPPED_VAES / "phantom-64")  # what the LDM loads
  assert not (tmp_path / "vae" / "checkpoints").exists()  # nothing trained
  # Measured on the job's own validation phantoms: a trained VAE, not a random one (~10 dB).
  assert result.eval["psnr"] > 25 and result.eval["count"] == config.data.num_validation
  assert _tiles(tmp_path / "vae" / "samples" / "reconstructions.png")[2] == 3
  record = json.loads((tmp_path / "stages" / "vae.json").read_text())
  assert record["config"]["vae_checkpoint"] == "phantom-64"  # a rerun with another one reruns


def test_a_missing_vae_checkpoint_fails_before_compute(tmp_path):
  with pytest.raises(FileNotFoundError, match="no_such_vae"):
    main_job.run(_config(f"vae_checkpoint={tmp_path / 'no_such_vae'}"), str(tmp_path / "w"))
  assert not (tmp_path / "w" / "data").exists()


@pytest.mark.parametrize("override,message", [
    ("stop_after=rl", "not a stage"),
    ("rlhf.rollout.eta=0.0", "eta must be > 0"),
    ("rlhf.rollout.candidates_per_prompt=1", "candidates_per_prompt must be >= 2"),
    ("rlhf.stage1.advantage_fallback=median", "advantage_fallback must be one of"),
    ("resolution=66", "not a multiple of the VAE.s downsampling factor 4"),
    # 68 px = 17 x 17 latents, which a two-level UNet cannot halve (main:test has one level).
    (("resolution=68", "ldm.unet.block_out_channels=(32, 32)",
      "ldm.unet.cross_attention=(True, False)"), "must be a multiple of"),
    ("vae.batch_size=0", "invalid VAE config"),
    ("grids.grades=(2, 5)", "DR grades 0-4"),
    ("report.samples_per_prompt=0", "at least 1"),
])
def test_bad_config_fails_before_compute(tmp_path, override, message):
  overrides = (override,) if isinstance(override, str) else override
  with pytest.raises(ValueError, match=message):
    main_job.run(_config(*overrides), str(tmp_path))
  assert not (tmp_path / "data").exists()


# One result of each stage, as the stages build them (JSON values only).
RESULTS = {
    "data": sr.DataResult(dataset="/w/data", splits={"train": 12, "test": 16}, stats="/w/s.json",
                          preview="/w/preview.png"),
    "vae": sr.TrainResult(workdir="/w/vae", checkpoints="/w/vae/checkpoints",
                          metrics="/w/vae/metrics.jsonl", samples="/w/vae/samples",
                          train={"loss": 0.5, "step": 2}, eval={"psnr": 12.5}),
    "ldm": sr.TrainResult(workdir="/w/ldm", checkpoints="/w/ldm/checkpoints",
                          metrics="/w/ldm/metrics.jsonl", samples="/w/ldm/samples",
                          train={"loss": 0.25}, eval={}, nonfinite_steps="1 updates skipped"),
    "grids": sr.GridsResult(grids={"dr0_right": "/w/grids/dr0_right.png"},
                            overview="/w/grids/overview.png"),
    "evaluator": sr.EvaluatorResult(evaluator_dir="/w/ev/evaluator", metrics="/w/ev/m.jsonl",
                                    heldout="/w/ev/heldout.json",
                                    heldout_accuracy={"dr_grade_accuracy": 0.75}, reused=True),
    "selector": sr.SelectorResult(workdir="/w/selector", checkpoints="/w/selector/checkpoints",
                                  metrics="/w/selector/m.jsonl", eval_report="/w/selector/e.json",
                                  threshold={"threshold": 0.5, "precision": 0.9, "recall": 0.4},
                                  threshold_source="graded", heldout_auroc=None),
    "rlhf": sr.RlhfResult(
        workdir="/w/rlhf", best_checkpoint="/w/rlhf/best", metrics="/w/rlhf/m.jsonl",
        report_html="/w/rlhf/report/report.html", report_json="/w/rlhf/report/report.json",
        curves="/w/c.png", curves_queries="/w/cq.png", grid_before="/w/gb.png",
        grid_after="/w/ga.png", stop_reason="", accepted_fraction=[0.5, 0.25], rounds_done=2,
        best_round=1, stopped=False, queries=64, reward_before=0.25, reward_after=0.5,
        composite_before=0.125, composite_after=0.0625, reward_kept=0.375, composite_kept=0.25,
        heldout_before={"darkness": 0.5}, heldout_after={"darkness": 0.25},
        heldout_kept={"darkness": 0.375}),
    "report": sr.ReportResult(report="/w/report/report.html", metrics_json="/w/report/m.json",
                              model="/w/rlhf/best", samples="/w/report/samples",
                              accepted_by_selector=0.5,
                              metrics={"KID": {"generated": 0.5, "phantoms": 0.0,
                                               "control": 1.0}}),
}


def test_every_stage_result_round_trips_through_json():
  assert [s.name for s in main_job.STAGES] == list(RESULTS)
  for stage in main_job.STAGES:
    result = RESULTS[stage.name]
    assert isinstance(result, stage.result)
    text = json.dumps(result.to_json())  # what stages/<name>.json holds under "outputs"
    assert stage.result.from_json(json.loads(text)) == result, stage.name
  # VAE stage files written before the last train record was kept still read.
  old = {k: v for k, v in RESULTS["vae"].to_json().items() if k != "train"}
  assert sr.TrainResult.from_json(old).train == {}


def test_result_from_outputs_keeps_its_fields_only():
  outputs = {**RESULTS["rlhf"].to_json(), "checkpoints": "/w/rlhf/checkpoints",
             "results": {"not": "kept"}, "reward_after": np.float32(0.5)}
  result = sr.RlhfResult.from_outputs(outputs)
  assert result == RESULTS["rlhf"] and isinstance(result.reward_after, float)  # not float32
  # summary.json's RLHF figures are the fields marked as figures: no paths among them.
  assert set(result.figures()) == {
      "rounds_done", "best_round", "stopped", "queries", "reward_before", "reward_after",
      "composite_before", "composite_after", "reward_kept", "composite_kept", "heldout_before",
      "heldout_after", "heldout_kept"}
  with pytest.raises(ValueError, match="best_checkpoint"):
    sr.RlhfResult.from_outputs({k: v for k, v in outputs.items() if k != "best_checkpoint"})
  with pytest.raises(ValueError, match="unexpected keyword argument 'extra'"):
    sr.DataResult.from_json({**RESULTS["data"].to_json(), "extra": 1})


def _fake_stage(name, calls, check=None):
  """A stage returning RESULTS[name] (after `check(job)`), recording that it ran."""
  def fn(job):
    calls.append(name)
    if check is not None:
      check(job)
    return RESULTS[name]
  return main_job.Stage(name, fn, type(RESULTS[name]), ())


def test_rerun_reads_typed_results_back_from_stage_files(tmp_path):
  config, calls, seen = _config(), [], []
  outputs = main_job.run(config, str(tmp_path), [_fake_stage("data", calls)])
  assert outputs == {"summary": str(tmp_path / "summary.json"), "data preview": "/w/preview.png"}
  record = json.loads((tmp_path / "stages" / "data.json").read_text())
  assert record["outputs"] == RESULTS["data"].to_json()
  # A rerun skips the data stage; the next stage sees its result read back, as typed fields.
  stages = [_fake_stage("data", calls),
            _fake_stage("ldm", calls, lambda job: seen.append(dataclasses.replace(job.results)))]
  outputs = main_job.run(config, str(tmp_path), stages)
  assert calls == ["data", "ldm"]
  assert seen == [sr.Results(data=RESULTS["data"])]
  assert outputs["ldm checkpoints"] == "/w/ldm/checkpoints"
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["stages"]["data"]["skipped"] and not summary["stages"]["ldm"]["skipped"]
  assert summary["metrics"] == {"ldm_train_loss": 0.25, "ldm_eval_loss": None}


@pytest.mark.parametrize("text", ["{not json", '{"seconds": 1, "cpu_seconds": 1, "config": {}}',
                                  '{"seconds": 1, "cpu_seconds": 1, "config": {}, '
                                  '"outputs": {"dataset": "/d"}}'],
                         ids=["not json", "no outputs", "fields missing"])
def test_a_stage_file_without_its_result_is_named(tmp_path, text):
  (tmp_path / "stages").mkdir()
  marker = tmp_path / "stages" / "data.json"
  marker.write_text(text)
  calls = []
  with pytest.raises(main_job.StageFileError, match=re.escape(str(marker)) + " does not hold a "
                     "finished data stage's DataResult .*delete it to run the stage again"):
    main_job.run(_config(), str(tmp_path), [_fake_stage("data", calls)])
  assert not calls  # not run again unasked


def test_unfinished_stage_is_not_marked(tmp_path):
  stage = main_job.Stage("vae", lambda job: sr.Unfinished("preempted at step 1", "SIGTERM"),
                         sr.TrainResult, ())
  outputs = main_job.run(_config(), str(tmp_path), [stage, _fake_stage("ldm", [])])
  assert outputs == {"summary": str(tmp_path / "summary.json"),
                     "stopped": "stage vae unfinished: preempted at step 1",
                     "preempted": "SIGTERM"}
  assert not list((tmp_path / "stages").iterdir())


def _png(path):
  Image.new("RGB", (8, 8)).save(path)
  return str(path)


def test_report_stage_calls_the_evaluate_command_function(tmp_path, monkeypatch):
  history = [{"round": r, "queries": 32 * r, "reward": 0.1 * r, "composite": 0.2,
              "metrics": {"darkness": 0.5}} for r in range(3)]
  (tmp_path / "report.json").write_text(json.dumps({"history": history}))
  rlhf = dataclasses.replace(
      RESULTS["rlhf"], report_json=str(tmp_path / "report.json"),
      **{name: _png(tmp_path / f"{name}.png")
         for name in ("curves", "curves_queries", "grid_before", "grid_after")})
  calls = []

  def evaluate_checkpoint(checkpoint_dir, out_dir, **kwargs):
    calls.append((checkpoint_dir, out_dir, kwargs))
    return {"report": f"{out_dir}/report.html", "metrics_json": f"{out_dir}/metrics.json",
            "accepted_by_selector": 0.25, "samples": [],
            "table": [{"metric": "KID", "generated": 0.5, "phantoms": 0.0, "control": 1.0,
                       "control_set": "blurred"}]}
  monkeypatch.setattr(eval_run, "evaluate_checkpoint", evaluate_checkpoint)
  config = _config()
  job = main_job.Job(config, tmp_path, config.data, sr.Results(
      ldm=RESULTS["ldm"], evaluator=RESULTS["evaluator"], selector=RESULTS["selector"],
      rlhf=rlhf))
  result = main_job.report_stage(job)
  [(checkpoint_dir, out_dir, kwargs)] = calls
  assert (checkpoint_dir, out_dir) == ("/w/rlhf/best", str(tmp_path / "report"))  # kept model
  assert kwargs["evaluator_dir"] == "/w/ev/evaluator" and kwargs["selector_dir"] == "/w/selector"
  assert kwargs["num_heldout"] == config.data.num_test and callable(kwargs["data"])
  assert kwargs["config"]["num_steps"] == config.report.sampler_steps
  assert "kept round 1" in kwargs["note"]
  [section] = kwargs["sections"]  # the RLHF section, built by fundax.eval.report
  assert "RLHF: 2 rounds, kept round 1" in section and section.count("data:image/png") == 4
  assert result == sr.ReportResult(
      report=str(tmp_path / "report" / "report.html"),
      metrics_json=str(tmp_path / "report" / "metrics.json"), model="/w/rlhf/best",
      samples=str(tmp_path / "report" / "samples"), accepted_by_selector=0.25,
      metrics={"KID": {"generated": 0.5, "phantoms": 0.0, "control": 1.0}})


def test_the_compute_study_reads_its_targets_from_a_main_job_report(job):
  """bench/compute_study.py's reading of one budget: the report's figures, unchanged."""
  spec = importlib.util.spec_from_file_location("compute_study", "bench/compute_study.py")
  study = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(study)
  _, workdir, _ = job
  row = study.readings(workdir)
  metrics = json.loads((workdir / "report" / "metrics.json").read_text())
  fd = next(r for r in metrics["table"] if r["metric"] == study.FD_ROW)
  assert row["disc_side_macula"] == metrics["anatomy"]["laterality"]["accuracy_macula"]
  assert row["vessel_ratio"] == metrics["anatomy"]["vessel_ratio"]
  assert row["laterality_agreement"] == metrics["consistency"]["laterality"]["accuracy"]
  assert row["field_agreement"] == metrics["consistency"]["field"]["accuracy"]
  assert row["fd_over_floor"] == pytest.approx(fd["generated"] / fd["phantoms"])
  assert row["c2st_accuracy"] == metrics["c2st"]["generated"]["accuracy"]
  assert row["ldm_seconds"] > 0
  assert study.met(0.9, 0.9, "min") and not study.met(0.89, 0.9, "min")
  assert study.met(2.9, 3.0, "max") and not study.met(0.5, (0.6, 1.4), "range")
  assert study.met(0.84, None, "report") is None
