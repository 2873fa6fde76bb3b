"""The main job: phantom data, VAE, LDM, grids per DR grade and eye, RLHF rounds, the report.

`run(config, workdir)` runs `STAGES` (configs/main.py) in order:

  data       build the phantom dataset, its statistics and a preview grid
  vae        train the autoencoder (fundax.trainers.vae) on that dataset, or measure the
             trained one `vae_checkpoint` names (the Quickstart's: the one fundax ships)
  ldm        train the text-conditioned latent diffusion UNet on the VAE's latents
  grids      SYNTHETIC-stamped sample grids, one per DR grade and eye, prompted with captions of
             phantom cases of that grade and eye
  evaluator  train the independent evaluator (fundax.eval.evaluator_train)
  selector   train the Selector reward model (fundax.selector.train)
  rlhf       rounds of two-stage RLHF (fundax.rl.rounds) from the LDM, rewarded by the Selector,
             with simulated raters and the reward-hacking guard judged by the evaluator
  report     the independent evaluation of the model RLHF kept, by the function `fundax
             evaluate` runs (fundax.eval.run.evaluate_checkpoint) on the job's dataset, with the
             Selector's scores beside it and the RLHF rounds' curves and before/after grids

A stage is a function of the `Job` (config, workdir, and the results of the stages before it)
returning its typed result (fundax.trainers.stage_results: paths, key metrics). A finished
stage writes `<workdir>/stages/<name>.json` (the result, its times and settings); a rerun skips
it and reads the result back, while a stage that was interrupted resumes from its own
checkpoints (every trainer resumes from its workdir). A stage file that does not hold its
stage's result (damaged, or written by an older fundax) stops the job with a `StageFileError`
naming it, rather than running the stage again unasked; delete the file to rerun the stage. A
trainer stopped before its last step (SIGTERM: preemption) returns `Unfinished`: its stage is
left unmarked and the job stops there, so no later stage builds on a half-trained model.
`<workdir>/summary.json` is rewritten after every stage with per-stage wall and CPU times and
the key metrics. A new stage is a `Stage` in `STAGES` with its result class and a field of
`Results`; it finds earlier results (the LDM checkpoint, the Selector, the evaluator, the
RLHF-kept model) as typed fields of `job.results`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from fundax import sampling
from fundax.data import captions as captions_lib
from fundax.data import datasets
from fundax.data import labels as labels_lib
from fundax.data import phantom
from fundax.data import preview
from fundax.eval import evaluator_train
from fundax.eval import report as eval_report
from fundax.eval import run as eval_run
from fundax.rl import rounds
from fundax.selector import train as selector_train
from fundax.train import loop
from fundax.trainers import ldm as ldm_trainer
from fundax.trainers import vae as vae_trainer
from fundax.trainers.stage_results import (DataResult, EvaluatorResult, GridsResult, ReportResult,
                                           Results, RlhfResult, SelectorResult, StageResult,
                                           TrainResult, Unfinished)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Job:
  """What a stage sees: the config, the workdir, the dataset and earlier stages' results.

  Attributes:
    config: the main job's config (configs/main.py).
    workdir: the job's output directory.
    data: the resolved `data` section (data_dir filled in) every stage reads.
    results: the result each finished stage returned (or a rerun read back).
  """
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  data: ml_collections.ConfigDict
  results: Results = dataclasses.field(default_factory=Results)

  def stage_config(self, name: str) -> ml_collections.ConfigDict:
    """A copy of section `name` with references resolved and the job's dataset as `data`."""
    config = self.config[name].copy_and_resolve_references()
    return _with_data(config, self.data) if name in ("vae", "ldm") else config


def _with_data(config: ml_collections.ConfigDict,
               data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A trainer's section with the main job's dataset as its `data` (in place; returned)."""
  with config.unlocked():
    config.data = data.copy_and_resolve_references()
  return config


@dataclasses.dataclass(frozen=True)
class Stage:
  """One step of the main job.

  Attributes:
    name: the stage's name (its marker file and its field of `Results`).
    fn: `fn(job) -> result`, an instance of `result`, or `Unfinished` when a trainer stopped
      before its end.
    result: the class of its result (what a rerun reads its stage file back as).
    sections: the config sections it reads (recorded, to warn when a rerun changed them).
  """
  name: str
  fn: Callable[[Job], StageResult | Unfinished]
  result: type[StageResult]
  sections: tuple[str, ...]


class StageFileError(ValueError):
  """A stages/<name>.json that does not hold its stage's result (damaged, or an older layout)."""


def _last_row(metrics_path: str, split: str) -> dict[str, float]:
  """The last record of `split` in a trainer's metrics.jsonl ({} when there is none)."""
  last = {}
  with open(metrics_path, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if row.get("split") == split:
        last = row
  return {k: v for k, v in last.items() if k not in ("split", "time")}


def data_stage(job: Job) -> DataResult:
  """Builds the phantom dataset, writes its statistics and a preview grid."""
  c = job.config
  build = datasets.build_from_config(job.data)
  stats_path = job.workdir / "data_stats.json"
  stats_path.write_text(json.dumps({"build": build, "stats": datasets.stats_from_config(job.data)},
                                   indent=2))
  source = datasets.load_from_config(job.data, c.preview.split)
  grid = preview.preview_source(
      source, num_images=c.preview.num_images, seed=c.seed, columns=c.preview.columns,
      tile=c.preview.tile,
      title=f"fundax phantom, {job.data.resolution} px, split {c.preview.split}")
  preview_path = job.workdir / "preview.png"
  grid.save(preview_path)
  return DataResult(dataset=build["data_dir"], splits=build["splits"], stats=str(stats_path),
                    preview=str(preview_path))


def _trained(outputs: dict[str, str]) -> TrainResult | Unfinished:
  """A trainer's `run` outputs as its stage's result, with its last train and eval records."""
  if stop := Unfinished.of(outputs):
    return stop
  return TrainResult.from_outputs(outputs, train=_last_row(outputs["metrics"], "train"),
                                  eval=_last_row(outputs["metrics"], "eval"))


def vae_stage(job: Job) -> TrainResult | Unfinished:
  """Trains (or resumes) the VAE in `<workdir>/vae`, or, when `vae_checkpoint` names a trained
  one (the Quickstart's: the autoencoder fundax ships), measures that one on the job's
  validation split (`fundax.trainers.vae.evaluate`) for the LDM to train on."""
  config, workdir = job.stage_config("vae"), str(job.workdir / "vae")
  if job.config.vae_checkpoint:
    return _trained(vae_trainer.evaluate(config, job.config.vae_checkpoint, workdir))
  return _trained(vae_trainer.run(config, workdir))


def ldm_stage(job: Job) -> TrainResult | Unfinished:
  """Trains (or resumes) the LDM in `<workdir>/ldm` on the VAE stage's autoencoder."""
  config = job.stage_config("ldm")
  config.vae_checkpoint = job.results.vae.checkpoints
  return _trained(ldm_trainer.run(config, str(job.workdir / "ldm")))


def grid_prompts(grade: int, laterality: str, num: int, first_seed: int) -> list[str]:
  """Captions of `num` good-quality phantom cases with this DR grade and eye.

  Args:
    grade: DR grade, 0-4.
    laterality: "right" or "left".
    num: number of prompts; their caption styles cycle through all phrasings.
    first_seed: case seed of the first prompt (then first_seed + 1, ...).

  Returns:
    The prompts.
  """
  return [captions_lib.caption(
      phantom.generate(first_seed + i, 64, dr_grade=grade, laterality=laterality,
                       quality="good").labels, style=i % captions_lib.NUM_STYLES)
          for i in range(num)]


def grids_stage(job: Job) -> GridsResult:
  """One sample grid per DR grade and eye, plus an overview with one sample of each."""
  g = job.config.grids
  pipe = sampling.load_pipeline(job.results.ldm.checkpoints)
  generate_fn = sampling.make_generate_fn(pipe.models, sampler=g.sampler, num_steps=g.num_steps)
  key = jax.random.key(job.config.seed)
  out_dir = job.workdir / "grids"
  grids, overview = {}, {}
  for eye in labels_lib.LATERALITIES:
    for grade in g.grades:
      prompts = grid_prompts(grade, eye, g.tiles, g.prompt_seed)
      tokens = sampling.tokenize_prompts(pipe, prompts)
      images = np.asarray(generate_fn(
          pipe.params, tokens["input_ids"], tokens["attention_mask"],
          jax.random.fold_in(key, len(grids)), g.guidance_scale, mirror=tokens["mirror"]))
      path = out_dir / f"dr{grade}_{eye}.png"
      loop.save_grid(path, images, prompts, synthetic=True,
                     title=f"fundax LDM samples, DR grade {grade}, {eye} eye: {g.sampler} "
                     f"{g.num_steps} steps, guidance {g.guidance_scale}")
      grids[f"dr{grade}_{eye}"] = str(path)
      overview[f"DR grade {grade}, {eye} eye"] = images[0]
  overview_path = out_dir / "overview.png"
  loop.save_grid(overview_path, np.stack(list(overview.values())), list(overview),
                 synthetic=True, columns=len(g.grades),
                 title="fundax LDM: one sample per DR grade (columns) and eye (rows)")
  return GridsResult(grids=grids, overview=str(overview_path))


def evaluator_stage(job: Job) -> EvaluatorResult | Unfinished:
  """Trains (or resumes, or reuses) the independent evaluator.

  With `evaluator_cache` set, the run is keyed by the evaluator config (and the trainer's
  VERSION): the evaluator shipped with fundax for that recipe when there is one (the
  Quickstart's), else `<evaluator_cache>/<key>`, trained once per resolution and recipe and
  reused by every later main job (its held-out table comes with it). Otherwise it trains in
  `<workdir>/evaluator`.
  """
  config = job.stage_config("evaluator")
  if job.config.evaluator_cache:
    workdir, finished = evaluator_train.find_run(config, job.config.evaluator_cache)
  else:
    workdir = job.workdir / "evaluator"
    finished = evaluator_train.finished_run(workdir)
  if finished is not None:
    log.info("evaluator: reusing the finished run %s (same config)", workdir)
    return EvaluatorResult.from_outputs(finished, reused=True)
  outputs = evaluator_train.train_evaluator(config, str(workdir))
  if stop := Unfinished.of(outputs):
    return stop
  return EvaluatorResult.from_outputs(outputs, reused=False)


def selector_stage(job: Job) -> SelectorResult | Unfinished:
  """Trains (or resumes) the Selector in `<workdir>/selector`."""
  outputs = selector_train.train_selector(job.stage_config("selector"),
                                          str(job.workdir / "selector"))
  if stop := Unfinished.of(outputs):
    return stop
  report = outputs["report"]
  source = report["threshold_source"]
  return SelectorResult.from_outputs(outputs, threshold=report["threshold"],
                                     threshold_source=source,
                                     heldout_auroc=report["heldout"][source].get("auroc"))


def _rlhf_inputs(config: ml_collections.ConfigDict, *, ldm_checkpoint: str, selector_dir: str,
                 evaluator_dir: str) -> ml_collections.ConfigDict:
  """The RLHF section with the LDM, Selector and evaluator of the earlier stages filled in."""
  with config.unlocked():
    config.ldm_checkpoint = ldm_checkpoint
    config.selector_checkpoint = selector_dir
    config.evaluator_checkpoint = evaluator_dir
  return config


def rlhf_stage(job: Job) -> RlhfResult | Unfinished:
  """Runs (or resumes) the RLHF rounds in `<workdir>/rlhf` from the LDM stage's checkpoint."""
  r = job.results
  config = _rlhf_inputs(job.stage_config("rlhf"), ldm_checkpoint=r.ldm.checkpoints,
                        selector_dir=r.selector.workdir,
                        evaluator_dir=r.evaluator.evaluator_dir)
  outputs = rounds.run(config, str(job.workdir / "rlhf"))
  if stop := Unfinished.of(outputs):
    return stop
  return RlhfResult.from_outputs(outputs)


def _rlhf_section(rlhf: RlhfResult) -> str:
  """The report's RLHF section (built by fundax.eval.report) from the rounds' history and PNGs."""
  history = json.loads(pathlib.Path(rlhf.report_json).read_text())["history"]
  return eval_report.rlhf_section(
      history, best_round=rlhf.best_round, stop_reason=rlhf.stop_reason, curves=rlhf.curves,
      curves_queries=rlhf.curves_queries, grid_before=rlhf.grid_before,
      grid_after=rlhf.grid_after)


def report_stage(job: Job) -> ReportResult:
  """Evaluates the kept model the way `fundax evaluate` does, on the job's own dataset.

  Prompts are the distinct captions of the test split; the reference (fidelity, privacy) is
  the first `report.num_reference` training images and TSTR tests on the whole test split.
  The samples are scored by the Selector as image files, as in the feedback loop.
  """
  r, results = job.config.report, job.results
  rlhf = results.rlhf
  model = results.ldm.checkpoints if rlhf is None else rlhf.best_checkpoint
  kept = "" if rlhf is None else f" after RLHF (kept round {rlhf.best_round})"
  out_dir = job.workdir / "report"
  evaluated = eval_run.evaluate_checkpoint(
      model, str(out_dir), evaluator_dir=results.evaluator.evaluator_dir,
      selector_dir=results.selector.workdir,
      data=functools.partial(datasets.read_split, job.data, resolution=job.config.resolution),
      num_prompts=r.num_prompts, num_reference=r.num_reference, num_heldout=job.data.num_test,
      config={"samples_per_prompt": r.samples_per_prompt, "num_steps": r.sampler_steps,
              "guidance_scale": r.guidance_scale, "seed": job.config.seed,
              "batch_size": r.batch_size, "kid_subsets": r.kid_subsets,
              "utility": {"steps": r.utility_steps}, "c2st": {"steps": r.c2st_steps},
              "num_workers": r.num_workers},
      note=(f"fundax main job: the {job.config.resolution} px LDM{kept}; prompts: test-split "
            "phantom captions; reference: its phantom training images (fidelity, privacy); "
            "TSTR tested on its held-out phantom test images."),
      sections=() if rlhf is None else [_rlhf_section(rlhf)])
  return ReportResult(
      report=evaluated["report"], metrics_json=evaluated["metrics_json"], model=model,
      samples=str(out_dir / eval_run.SAMPLES_DIR),
      accepted_by_selector=evaluated["accepted_by_selector"],
      metrics={row["metric"]: {k: row[k] for k in ("generated", "phantoms", "control")}
               for row in evaluated["table"]})


STAGES: list[Stage] = [
    Stage("data", data_stage, DataResult, ("data", "preview")),
    Stage("vae", vae_stage, TrainResult, ("data", "resolution", "vae", "vae_checkpoint")),
    Stage("ldm", ldm_stage, TrainResult, ("data", "resolution", "ldm")),
    Stage("grids", grids_stage, GridsResult, ("grids",)),
    Stage("evaluator", evaluator_stage, EvaluatorResult,
          ("resolution", "evaluator", "evaluator_cache")),
    Stage("selector", selector_stage, SelectorResult, ("resolution", "selector")),
    Stage("rlhf", rlhf_stage, RlhfResult, ("rlhf",)),
    Stage("report", report_stage, ReportResult, ("data", "resolution", "report")),
]


def check_config(config: ml_collections.ConfigDict, stages: Sequence[Stage]) -> None:
  """Fails with a clear message, before any compute, on settings the job cannot run."""
  names = [s.name for s in stages]
  unknown = set(names) - {f.name for f in dataclasses.fields(Results)}
  if unknown:
    raise ValueError(f"stages {sorted(unknown)} have no field in stage_results.Results")
  if config.stop_after and config.stop_after not in names:
    raise ValueError(f"stop_after={config.stop_after!r} is not a stage; stages: {names}")
  resolved = config.copy_and_resolve_references()
  vae_trainer.validate_config(_with_data(resolved.vae, resolved.data))
  ldm = _with_data(resolved.ldm, resolved.data)
  with ldm.unlocked():  # the LDM trains on the VAE stage's autoencoder: check with its shape
    if config.vae_checkpoint:
      ldm.vae_checkpoint = config.vae_checkpoint
    for field in ("block_out_channels", "latent_channels", "norm_num_groups"):
      ldm.vae[field] = resolved.vae.model[field]
  ldm_trainer.validate_config(ldm)
  bad = [g for g in config.grids.grades if g not in range(5)]
  if bad or not config.grids.grades:
    raise ValueError(f"grids.grades must be DR grades 0-4, got {tuple(config.grids.grades)}")
  for name in ("grids.tiles", "report.num_prompts", "report.samples_per_prompt",
               "report.batch_size"):
    section, field = name.split(".")
    if config[section][field] < 1:
      raise ValueError(f"{name} must be at least 1, got {config[section][field]}")
  if config.data.num_test < 1:
    raise ValueError("data.num_test must be at least 1: the report's prompts and TSTR "
                     "images come from the test split")
  if "rlhf" in names and (not config.stop_after
                          or names.index(config.stop_after) >= names.index("rlhf")):
    # The inputs come from earlier stages; placeholders let the rest be checked now.
    rounds.check_config(_rlhf_inputs(config.rlhf.copy_and_resolve_references(),
                                     ldm_checkpoint="ldm", selector_dir="selector",
                                     evaluator_dir="evaluator"))


def _cpu_seconds() -> float:
  """CPU time of this process and its finished children (all threads), seconds."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _sections(config: ml_collections.ConfigDict, stage: Stage) -> dict[str, Any]:
  resolved = config.copy_and_resolve_references()
  return {s: (resolved[s].to_dict() if isinstance(resolved[s], ml_collections.ConfigDict)
              else resolved[s]) for s in stage.sections}


def _key_metrics(results: Results) -> dict[str, Any]:
  """The figures summary.json leads with, from whichever stages have finished."""
  out = {}
  if results.vae is not None:
    out["vae_eval"] = results.vae.eval
  if results.ldm is not None:
    out["ldm_train_loss"] = results.ldm.train.get("loss")
    out["ldm_eval_loss"] = results.ldm.eval.get("loss")
  if results.evaluator is not None:
    out["evaluator_heldout"] = results.evaluator.heldout_accuracy
  if results.selector is not None:
    out["selector_heldout_auroc"] = results.selector.heldout_auroc
  if results.rlhf is not None:
    out["rlhf"] = results.rlhf.figures()
  if results.report is not None:
    out["report"] = results.report.metrics
  return out


def _read_stage(marker: pathlib.Path, stage: Stage) -> tuple[dict[str, Any], StageResult]:
  """The record a finished stage wrote to `marker` and its result.

  Raises:
    StageFileError: the file holds no such record (damaged, or written by an older fundax).
  """
  try:
    record = json.loads(marker.read_text())
    if not all(k in record for k in ("seconds", "cpu_seconds", "config")):
      raise ValueError("it lacks the stage's times or settings")
    return record, stage.result.from_json(record["outputs"])
  except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
    raise StageFileError(f"{marker} does not hold a finished {stage.name} stage's "
                         f"{stage.result.__name__} ({e}); delete it to run the stage "
                         "again") from e


def _printed(results: Results) -> dict[str, str]:
  """The outputs `fundax main` prints, of the stages that finished."""
  r = results
  printed = {"data preview": r.data and r.data.preview,
             "ldm checkpoints": r.ldm and r.ldm.checkpoints,
             "grids overview": r.grids and r.grids.overview,
             "rlhf best_checkpoint": r.rlhf and r.rlhf.best_checkpoint,
             "rlhf report_html": r.rlhf and r.rlhf.report_html,
             "report report": r.report and r.report.report}
  return {name: path for name, path in printed.items() if path}


def run(config: ml_collections.ConfigDict, workdir: str,
        stages: Sequence[Stage] | None = None) -> dict[str, str]:
  """Runs (or resumes) the main job.

  Args:
    config: a config from configs/main.py.
    workdir: output directory; created if missing. A rerun skips the stages finished there.
    stages: the stages to run, in order; None for `STAGES`.

  Returns:
    Output name -> path, for the CLI to print; only "summary" and "stopped" when a stage ended
    unfinished (a signal or stop_at_step): it is not marked and nothing after it runs, so a
    rerun of the same command resumes it. A preempted stage adds "preempted", the signal's
    name (the CLI exits with the preemption code).

  Raises:
    StageFileError: a finished stage's file that does not hold its result (it names the file).
  """
  stages = list(STAGES if stages is None else stages)
  check_config(config, stages)
  if config.stop_after:
    stages = stages[:[s.name for s in stages].index(config.stop_after) + 1]
  workdir = pathlib.Path(workdir)
  (workdir / "stages").mkdir(parents=True, exist_ok=True)
  data = config.data.copy_and_resolve_references()  # the caller's config stays as given
  data.data_dir = data.data_dir or str(workdir / "data")
  job = Job(config, workdir, data)
  summary_path = workdir / "summary.json"
  summary = {"stages": {}, "load_average_at_start": os.getloadavg(), "cpu_count": os.cpu_count()}
  start = time.time()
  for i, stage in enumerate(stages):
    marker = workdir / "stages" / f"{stage.name}.json"
    sections = _sections(config, stage)
    if marker.exists():
      record, result = _read_stage(marker, stage)
      if record["config"] != json.loads(json.dumps(sections)):
        log.warning("stage %s finished earlier with other settings; keeping its outputs "
                    "(delete %s to run it again)", stage.name, marker)
      log.info("stage %d/%d %s: finished in an earlier run (%.0f s), skipped", i + 1,
               len(stages), stage.name, record["seconds"])
      summary["stages"][stage.name] = {**record, "skipped": True}
    else:
      log.info("stage %d/%d %s: starting (%.0f s into this run)", i + 1, len(stages),
               stage.name, time.time() - start)
      t0, cpu0 = time.time(), _cpu_seconds()
      result = stage.fn(job)
      if isinstance(result, Unfinished):
        # SIGTERM (preemption) or stop_at_step: the stage is not finished, so it is not marked
        # and nothing after it runs on its half-trained model; a rerun resumes it.
        reason = f"stage {stage.name} unfinished: {result.reason}"
        log.warning("%s; rerun the same command to resume", reason)
        summary["stopped"] = reason
        summary_path.write_text(json.dumps(summary, indent=2, default=float))
        stopped = {"summary": str(summary_path), "stopped": reason}
        if result.preempted:
          stopped["preempted"] = result.preempted
        return stopped
      if not isinstance(result, stage.result):
        raise TypeError(f"stage {stage.name} returned a {type(result).__name__}, not the "
                        f"{stage.result.__name__} its stage file is read back as")
      record = {"seconds": time.time() - t0, "cpu_seconds": _cpu_seconds() - cpu0,
                "load_average": os.getloadavg(), "outputs": result.to_json(),
                "config": sections}
      marker.write_text(json.dumps(record, indent=2, default=float))
      log.info("stage %d/%d %s: done in %.0f s (%.0f s CPU; %.0f s into this run)", i + 1,
               len(stages), stage.name, record["seconds"], record["cpu_seconds"],
               time.time() - start)
      summary["stages"][stage.name] = {**record, "skipped": False}
    setattr(job.results, stage.name, result)
    summary["seconds_this_run"] = time.time() - start
    summary["seconds_all_stages"] = sum(s["seconds"] for s in summary["stages"].values())
    summary["metrics"] = _key_metrics(job.results)
    summary_path.write_text(json.dumps(summary, indent=2, default=float))
  return {"summary": str(summary_path), **_printed(job.results)}
