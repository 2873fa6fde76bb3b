"""Compute vs quality of the Quickstart's generator: each issue-18 target against images seen.

    python bench/compute_study.py                                  # 300 600 1200 2400 steps
    python bench/compute_study.py --budgets 300 600 --workdir runs/study --name tiny

For each budget (LDM optimizer steps at the recipe's batch of 16; its learning-rate schedule
spans that budget, so each budget is a run of its own, not a checkpoint of a longer one) the
main job (`configs/main.py:tiny`) runs its stages data, vae (the shipped `phantom-64`), ldm,
evaluator (the shipped one), selector and report in <workdir>/steps_<N>, without RLHF: the
report measures the LDM itself, with the instruments of the Quickstart's targets table (16
test-split prompts x 4 samples, DDIM 25 steps, guidance 3). The budgets share one frozen
cache, so each run trains on the same latents and token states. A rerun resumes: finished
budgets are read back.

Writes bench/results/compute_<name>.json (per budget: the images seen, training seconds and
each target metric beside its target), compute_<name>.png (each metric against images seen,
the target as a dashed line) and compute_<name>_samples.png (the same prompt and noise at each
budget, SYNTHETIC-stamped).
"""

import argparse
import datetime
import json
import pathlib
import sys

import numpy as np
from PIL import Image

from fundax import configlib
from fundax import images as images_lib
from fundax.trainers import main_job

STAGES = ("data", "vae", "ldm", "evaluator", "selector", "report")
# Issue 18's Quickstart targets: (metric key, label, target, direction).
TARGETS = (
    ("disc_side_macula", "optic disc on the prompt's side (macula-centred)", 0.90, "min"),
    ("vessel_ratio", "vessel fraction / phantoms'", (0.6, 1.4), "range"),
    ("laterality_agreement", "evaluator-read laterality agreement", 0.90, "min"),
    ("field_agreement", "evaluator-read field agreement", 0.80, "min"),
    ("fd_over_floor", "domain FD / phantom floor", 3.0, "max"),
    ("c2st_accuracy", "C2ST accuracy (0.5 = indistinguishable)", None, "report"),
)
FD_ROW = "Fréchet distance (evaluator features)"
CONFIG = "configs/main.py:tiny"


def budget_config(budget: int, cache_dir: pathlib.Path):
  """The Quickstart's config with an LDM of `budget` steps on the study's shared cache."""
  config = configlib.load_config(CONFIG)
  return configlib.apply_overrides(config, [f"ldm.num_steps={budget}",
                                            f"ldm.cache.dir={cache_dir}"])


def readings(workdir: pathlib.Path) -> dict:
  """The target metrics of one budget's report (report/metrics.json) and its LDM's time."""
  metrics = json.loads((workdir / "report" / "metrics.json").read_text())
  table = {row["metric"]: row for row in metrics["table"]}
  fd = table[FD_ROW]
  consistency = metrics["consistency"]
  c2st = metrics["c2st"]["generated"]
  summary = json.loads((workdir / "summary.json").read_text())
  ldm = summary["stages"]["ldm"]
  return {
      "disc_side_macula": metrics["anatomy"]["laterality"]["accuracy_macula"],
      "disc_side_all": metrics["anatomy"]["laterality"]["accuracy"],
      "vessel_ratio": metrics["anatomy"]["vessel_ratio"],
      "laterality_agreement": consistency["laterality"]["accuracy"],
      "field_agreement": consistency["field"]["accuracy"],
      "fd": fd["generated"], "fd_floor": fd["phantoms"],
      "fd_over_floor": fd["generated"] / fd["phantoms"],
      "c2st_accuracy": c2st["accuracy"], "c2st_ci95": c2st["ci95"],
      "consistency": table["consistency: share of stated attributes the evaluator confirms"][
          "generated"],
      "ldm_seconds": ldm["seconds"], "ldm_cpu_seconds": ldm.get("cpu_seconds"),
  }


def met(value, target, direction) -> bool | None:
  """Whether `value` meets `target` ("min", "max", "range" (lo, hi)); None for "report"."""
  if direction == "min":
    return value >= target
  if direction == "max":
    return value <= target
  if direction == "range":
    return target[0] <= value <= target[1]
  return None


def plot(results: list[dict], path: pathlib.Path, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
  seen = [r["images_seen"] for r in results]
  for ax, (key, label, target, direction) in zip(axes.flat, TARGETS):
    ax.plot(seen, [r[key] for r in results], "o-")
    for value in ((target,) if np.isscalar(target) else target or ()):
      ax.axhline(value, ls="--", color="tab:red", lw=1)
    ax.set_xscale("log")
    ax.set_xticks(seen, [f"{s:,}" for s in seen], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("images seen (LDM steps x 16)")
    ax.set_title(label + ("" if direction == "report" else f" ({direction} target)"),
                 fontsize=9)
    ax.grid(alpha=0.3)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def samples_grid(runs: dict[int, pathlib.Path], path: pathlib.Path, samples_per_prompt: int,
                 per_budget: int = 8):
  """The first sample of the report's first prompts at every budget (same prompts, same noise),
  a row each."""
  tiles, labels = [], []
  for budget, workdir in runs.items():
    files = sorted((workdir / "report" / "samples").glob("*.png"))
    for f in files[::samples_per_prompt][:per_budget]:
      tiles.append(np.asarray(Image.open(f).convert("RGB")))
      labels.append(f"{budget} steps")
  images_lib.save_grid(path, np.stack(tiles), labels, columns=per_budget, synthetic=True,
                       tile=128, caption_lines=1,
                       title="one sample of each of the report's first prompts (columns) after "
                             "each LDM budget (rows): same prompts, same noise")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budgets", type=int, nargs="+", default=[300, 600, 1200, 2400],
                      help="LDM optimizer steps, one run each")
  parser.add_argument("--workdir", default="runs/compute_study")
  parser.add_argument("--name", default="tiny", help="results file suffix")
  parser.add_argument("--out-dir", default="bench/results")
  argv = sys.argv[1:] if argv is None else argv
  args = parser.parse_args(argv)
  root = pathlib.Path(args.workdir)
  stages = [s for s in main_job.STAGES if s.name in STAGES]
  runs, results = {}, []
  for budget in sorted(args.budgets):
    workdir = root / f"steps_{budget}"
    config = budget_config(budget, root / "cache")
    print(f"== LDM budget {budget} steps ({budget * config.ldm.batch_size} images) -> {workdir}",
          flush=True)
    main_job.run(config, str(workdir), stages=stages)
    runs[budget] = workdir
    row = {"ldm_steps": budget, "images_seen": budget * config.ldm.batch_size,
           **readings(workdir)}
    row["met"] = {key: met(row[key], target, direction)
                  for key, _, target, direction in TARGETS if direction != "report"}
    results.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "met"}, default=float), flush=True)
  out_dir = pathlib.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  stem = out_dir / f"compute_{args.name}"
  plot(results, stem.with_suffix(".png"),
       f"{CONFIG}: the LDM at {len(results)} budgets (no RLHF), "
       f"{datetime.date.today().isoformat()}")
  samples_grid(runs, out_dir / f"compute_{args.name}_samples.png",
               config.report.samples_per_prompt)
  stem.with_suffix(".json").write_text(json.dumps({
      "benchmark": "compute vs quality of the Quickstart's generator (issue 18, part 3)",
      "command": "python bench/compute_study.py " + " ".join(argv),
      "date": datetime.date.today().isoformat(), "config": CONFIG,
      "targets": [{"key": k, "label": l, "target": t, "direction": d}
                  for k, l, t, d in TARGETS],
      "budgets": results}, indent=2, default=float) + "\n")
  print(f"-> {stem}.json, {stem}.png")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
