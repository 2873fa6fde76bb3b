"""The main job: phantom data, VAE, LDM, grids per DR grade and eye, RLHF rounds, the report.

`run(config, workdir)` runs `STAGES` (configs/main.py) in order:

  data       build the phantom dataset, its statistics and a preview grid
  vae        train the autoencoder (fundax.trainers.vae) on that dataset
  ldm        train the text-conditioned latent diffusion UNet on the VAE's latents
  grids      SYNTHETIC-stamped sample grids, one per DR grade and eye, prompted with captions of
             phantom cases of that grade and eye
  evaluator  train the independent evaluator (fundax.eval.evaluator_train)
  selector   train the Selector reward model (fundax.selector.train)
  rlhf       rounds of two-stage RLHF (fundax.rl.rounds) from the LDM, rewarded by the Selector,
             with simulated raters and the reward-hacking guard judged by the evaluator
  report     sample from the model RLHF kept, score the samples with the Selector and write the
             independent evaluation report (fundax.eval.run.evaluate) beside those scores, with
             the RLHF rounds' curves and before/after grids

A stage is a function of the `Job` (config, workdir, and the outputs of the stages before it)
returning a JSON-able record of its outputs (paths, key metrics). A finished stage writes
`<workdir>/stages/<name>.json`; a rerun skips it and reads its outputs back, while a stage that
was interrupted resumes from its own checkpoints (every trainer resumes from its workdir). A
trainer stopped before its last step (SIGTERM: preemption) leaves its stage unmarked and the
job stops there, so no later stage builds on a half-trained model.
`<workdir>/summary.json` is rewritten after every stage with per-stage wall and CPU times and
the key metrics. A new stage is a `Stage` in `STAGES`; it finds earlier outputs (the LDM
checkpoint, the Selector, the evaluator, the RLHF-kept model) in `job.results`.
"""

from __future__ import annotations

import dataclasses
import html
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
from PIL import Image

from fundax import images as images_lib
from fundax import sampling
from fundax.data import captions as captions_lib
from fundax.data import datasets
from fundax.data import labels as labels_lib
from fundax.data import phantom
from fundax.data import pipeline
from fundax.data import preview
from fundax.data.builders import features
from fundax.eval import evaluator_train
from fundax.eval import report as eval_report
from fundax.eval import run as eval_run
from fundax.rl import rounds
from fundax.selector import score as selector_score
from fundax.selector import train as selector_train
from fundax.train import loop
from fundax.trainers import ldm as ldm_trainer
from fundax.trainers import vae as vae_trainer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Job:
  """What a stage sees: the config, the workdir, the dataset and earlier stages' outputs.

  Attributes:
    config: the main job's config (configs/main.py).
    workdir: the job's output directory.
    data: the resolved `data` section (data_dir filled in) every stage reads.
    results: stage name -> the outputs record it returned (or a rerun read back).
  """
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  data: ml_collections.ConfigDict
  results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

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
    name: the stage's name (its marker file and `job.results` key).
    fn: `fn(job) -> outputs`, a JSON-able dict of paths and key metrics.
    sections: the config sections it reads (recorded, to warn when a rerun changed them).
  """
  name: str
  fn: Callable[[Job], dict[str, Any]]
  sections: tuple[str, ...]


def _last_row(metrics_path: str, split: str) -> dict[str, float]:
  """The last record of `split` in a trainer's metrics.jsonl ({} when there is none)."""
  last = {}
  with open(metrics_path, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if row.get("split") == split:
        last = row
  return {k: v for k, v in last.items() if k not in ("split", "time")}


def _decode_split(data: ml_collections.ConfigDict, split: str, num: int, resolution: int):
  """The first `num` examples of a split: (images float [N, R, R, 3] in [-1, 1], labels, captions)."""
  source = datasets.load_from_config(data, split)
  examples = [features.decode_example(source[i]) for i in range(min(num, len(source)))]
  if not examples:
    raise ValueError(f"the {split} split of {data.name} is empty")
  images = np.stack([pipeline.to_float(pipeline.resize(e["image"], resolution))
                     for e in examples])
  return images, [e["labels"] for e in examples], [e["caption"] for e in examples]


def data_stage(job: Job) -> dict[str, Any]:
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
  return {"dataset": build["data_dir"], "splits": build["splits"], "stats": str(stats_path),
          "preview": str(preview_path)}


def vae_stage(job: Job) -> dict[str, Any]:
  """Trains (or resumes) the VAE in `<workdir>/vae`."""
  outputs = vae_trainer.run(job.stage_config("vae"), str(job.workdir / "vae"))
  return {**outputs, "eval": _last_row(outputs["metrics"], "eval")}


def ldm_stage(job: Job) -> dict[str, Any]:
  """Trains (or resumes) the LDM in `<workdir>/ldm` on the VAE stage's autoencoder."""
  config = job.stage_config("ldm")
  config.vae_checkpoint = job.results["vae"]["checkpoints"]
  outputs = ldm_trainer.run(config, str(job.workdir / "ldm"))
  return {**outputs, "train": _last_row(outputs["metrics"], "train"),
          "eval": _last_row(outputs["metrics"], "eval")}


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


def grids_stage(job: Job) -> dict[str, Any]:
  """One sample grid per DR grade and eye, plus an overview with one sample of each."""
  g = job.config.grids
  pipe = sampling.load_pipeline(job.results["ldm"]["checkpoints"])
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
  return {"grids": grids, "overview": str(overview_path)}


def evaluator_stage(job: Job) -> dict[str, Any]:
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
    return {**finished, "reused": True}
  return {**evaluator_train.train_evaluator(config, str(workdir)), "reused": False}


def selector_stage(job: Job) -> dict[str, Any]:
  """Trains (or resumes) the Selector in `<workdir>/selector`."""
  outputs = selector_train.train_selector(job.stage_config("selector"),
                                          str(job.workdir / "selector"))
  report = outputs.pop("report")
  source = report["threshold_source"]
  return {**outputs, "threshold": report["threshold"], "threshold_source": source,
          "heldout_auroc": report["heldout"][source].get("auroc")}


def _rlhf_inputs(config: ml_collections.ConfigDict, results: dict[str, dict[str, Any]]):
  """The RLHF section with the LDM, Selector and evaluator of the earlier stages filled in."""
  with config.unlocked():
    config.ldm_checkpoint = results["ldm"]["checkpoints"]
    config.selector_checkpoint = results["selector"]["workdir"]
    config.evaluator_checkpoint = results["evaluator"]["evaluator_dir"]
  return config


def rlhf_stage(job: Job) -> dict[str, Any]:
  """Runs (or resumes) the RLHF rounds in `<workdir>/rlhf` from the LDM stage's checkpoint."""
  outputs = rounds.run(_rlhf_inputs(job.stage_config("rlhf"), job.results),
                       str(job.workdir / "rlhf"))
  keep = ("workdir", "best_checkpoint", "metrics", "report_html", "report_json", "curves",
          "curves_queries", "grid_before", "grid_after", "best_round", "rounds_done", "stopped",
          "stop_reason", "queries", "reward_before", "reward_after", "composite_before",
          "composite_after", "accepted_fraction", "heldout_before", "heldout_after",
          "reward_kept", "composite_kept", "heldout_kept")
  return {k: outputs[k] for k in keep}


def _rlhf_section(rlhf: dict[str, Any]) -> str:
  """The report's RLHF section: guard verdict, before/after figures, curves and grids."""
  history = json.loads(pathlib.Path(rlhf["report_json"]).read_text())["history"]
  rows = "".join(
      f"<tr><td>{h['round']}</td><td>{h.get('queries', 0)}</td><td>{h['reward']:.4f}</td>"
      f"<td>{h['composite']:.4f}</td>"
      + "".join(f"<td>{v:.4f}</td>" for v in h["metrics"].values()) + "</tr>" for h in history)
  head = "".join(f"<th>{html.escape(k)}</th>" for k in history[0]["metrics"])
  guard = html.escape(rlhf["stop_reason"] or "no reward hacking detected")
  images = "".join(
      f"<p>{alt}</p><img src='{_png_uri(rlhf[name])}' alt='{alt}'>" for name, alt in (
          ("curves", "Selector reward and held-out composite per round"),
          ("curves_queries", "the same against cumulative Selector queries"),
          ("grid_before", "held-out prompts before RLHF (round 0)"),
          ("grid_after", f"held-out prompts at the kept round {rlhf['best_round']}")))
  return (f"<h2>RLHF: {rlhf['rounds_done']} rounds, kept round {rlhf['best_round']}</h2>"
          f"<p>Samples above come from the kept model. The Selector's reward (its own score, "
          f"which the rounds optimise) is shown beside the independent evaluator's held-out "
          f"metrics, which the guard watches: {guard}.</p>"
          f"<table><tr><th>round</th><th>Selector queries</th><th>Selector reward</th>"
          f"<th>held-out composite</th>{head}</tr>{rows}</table>{images}")


def _png_uri(path: str) -> str:
  with Image.open(path) as image:
    return eval_report.png_base64(image)


def report_stage(job: Job) -> dict[str, Any]:
  """Samples the kept model on held-out prompts, scores them with the Selector, writes the report."""
  r, resolution = job.config.report, job.config.resolution
  heldout, heldout_labels, heldout_captions = _decode_split(job.data, "test", job.data.num_test,
                                                            resolution)
  reference, reference_labels, _ = _decode_split(job.data, "train", r.num_reference, resolution)
  prompts = list(dict.fromkeys(heldout_captions))[:r.num_prompts]
  options = {"samples_per_prompt": r.samples_per_prompt, "num_steps": r.sampler_steps,
             "guidance_scale": r.guidance_scale, "seed": job.config.seed,
             "batch_size": r.batch_size,
             "kid_subsets": r.kid_subsets, "utility": {"steps": r.utility_steps},
             "c2st": {"steps": r.c2st_steps}, "num_workers": r.num_workers}
  rlhf = job.results.get("rlhf")
  model = rlhf["best_checkpoint"] if rlhf else job.results["ldm"]["checkpoints"]
  images, repeated = eval_run.generate_from_checkpoint(model, prompts, options)
  # The Selector scores image files, as it would in the feedback loop; the files stay.
  samples_dir = job.workdir / "report" / "samples"
  paths = images_lib.save_pngs(images, samples_dir, "{:04d}.png")
  scores = selector_score.score_images(job.results["selector"]["workdir"], paths, repeated)
  results = eval_run.evaluate(
      images, repeated, evaluator_dir=job.results["evaluator"]["evaluator_dir"],
      reference_images=reference, out_dir=str(job.workdir / "report"),
      reference_labels=reference_labels, heldout_images=heldout, heldout_labels=heldout_labels,
      selector_scores=[s["score"] for s in scores], config=options,
      sections=[_rlhf_section(rlhf)] if rlhf else (),
      note=(f"fundax main job: {len(images)} samples of the {resolution} px LDM"
            + (f" after RLHF (kept round {rlhf['best_round']})" if rlhf else "") + " for "
            f"{len(prompts)} test-split phantom captions, against {len(reference)} of its "
            f"phantom training images (fidelity, privacy); TSTR tested on {len(heldout)} "
            "held-out phantom test images."))
  return {"report": results["report"], "metrics_json": results["metrics_json"],
          "model": model, "samples": str(samples_dir), "accepted_by_selector": float(np.mean(
              [s["accepted"] for s in scores])),
          "metrics": {row["metric"]: {k: row[k] for k in ("generated", "phantoms", "control")}
                      for row in results["table"]}}


STAGES: list[Stage] = [
    Stage("data", data_stage, ("data", "preview")),
    Stage("vae", vae_stage, ("data", "resolution", "vae")),
    Stage("ldm", ldm_stage, ("data", "resolution", "ldm")),
    Stage("grids", grids_stage, ("grids",)),
    Stage("evaluator", evaluator_stage, ("resolution", "evaluator", "evaluator_cache")),
    Stage("selector", selector_stage, ("resolution", "selector")),
    Stage("rlhf", rlhf_stage, ("rlhf",)),
    Stage("report", report_stage, ("data", "resolution", "report")),
]


def check_config(config: ml_collections.ConfigDict, stages: Sequence[Stage]) -> None:
  """Fails with a clear message, before any compute, on settings the job cannot run."""
  names = [s.name for s in stages]
  if config.stop_after and config.stop_after not in names:
    raise ValueError(f"stop_after={config.stop_after!r} is not a stage; stages: {names}")
  resolved = config.copy_and_resolve_references()
  vae_trainer.validate_config(_with_data(resolved.vae, resolved.data))
  ldm = _with_data(resolved.ldm, resolved.data)
  with ldm.unlocked():  # the LDM trains on the VAE stage's autoencoder: check with its shape
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
    placeholder = {"ldm": {"checkpoints": "ldm"}, "selector": {"workdir": "selector"},
                   "evaluator": {"evaluator_dir": "evaluator"}}
    rounds.check_config(_rlhf_inputs(config.rlhf.copy_and_resolve_references(), placeholder))


def _cpu_seconds() -> float:
  """CPU time of this process and its finished children (all threads), seconds."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _sections(config: ml_collections.ConfigDict, stage: Stage) -> dict[str, Any]:
  resolved = config.copy_and_resolve_references()
  return {s: (resolved[s].to_dict() if isinstance(resolved[s], ml_collections.ConfigDict)
              else resolved[s]) for s in stage.sections}


def _key_metrics(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """The figures summary.json leads with, from whichever stages have finished."""
  out = {}
  if "vae" in results:
    out["vae_eval"] = results["vae"]["eval"]
  if "ldm" in results:
    out["ldm_train_loss"] = results["ldm"]["train"].get("loss")
    out["ldm_eval_loss"] = results["ldm"]["eval"].get("loss")
  if "evaluator" in results:
    out["evaluator_heldout"] = results["evaluator"]["heldout_accuracy"]
  if "selector" in results:
    out["selector_heldout_auroc"] = results["selector"]["heldout_auroc"]
  if "rlhf" in results:
    r = results["rlhf"]
    out["rlhf"] = {k: r[k] for k in ("rounds_done", "best_round", "stopped", "queries",
                                     "reward_before", "reward_after", "composite_before",
                                     "composite_after", "reward_kept", "composite_kept",
                                     "heldout_before", "heldout_after", "heldout_kept")}
  if "report" in results:
    out["report"] = results["report"]["metrics"]
  return out


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
      record = json.loads(marker.read_text())
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
      outputs = stage.fn(job)
      if "unfinished" in outputs:
        # SIGTERM (preemption) or stop_at_step: the stage is not finished, so it is not marked
        # and nothing after it runs on its half-trained model; a rerun resumes it.
        reason = f"stage {stage.name} unfinished: {outputs['unfinished']}"
        log.warning("%s; rerun the same command to resume", reason)
        summary["stopped"] = reason
        summary_path.write_text(json.dumps(summary, indent=2, default=float))
        stopped = {"summary": str(summary_path), "stopped": reason}
        if "preempted" in outputs:
          stopped["preempted"] = outputs["preempted"]
        return stopped
      record = {"seconds": time.time() - t0, "cpu_seconds": _cpu_seconds() - cpu0,
                "load_average": os.getloadavg(), "outputs": outputs, "config": sections}
      marker.write_text(json.dumps(record, indent=2, default=float))
      log.info("stage %d/%d %s: done in %.0f s (%.0f s CPU; %.0f s into this run)", i + 1,
               len(stages), stage.name, record["seconds"], record["cpu_seconds"],
               time.time() - start)
      summary["stages"][stage.name] = {**record, "skipped": False}
    job.results[stage.name] = summary["stages"][stage.name]["outputs"]
    summary["seconds_this_run"] = time.time() - start
    summary["seconds_all_stages"] = sum(s["seconds"] for s in summary["stages"].values())
    summary["metrics"] = _key_metrics(job.results)
    summary_path.write_text(json.dumps(summary, indent=2, default=float))
  outputs = {"summary": str(summary_path)}
  for name, key in (("data", "preview"), ("ldm", "checkpoints"), ("grids", "overview"),
                    ("rlhf", "best_checkpoint"), ("rlhf", "report_html"), ("report", "report")):
    if name in job.results:
      outputs[f"{name} {key}"] = job.results[name][key]
  return outputs
