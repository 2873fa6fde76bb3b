"""The independent evaluator's held-out phantom table at 64 and 128 px, against issue 17's targets.

    python bench/judges.py                       # both resolutions; trains what is not found
    python bench/judges.py --resolutions 64      # the Quickstart's evaluator only
    python bench/judges.py --ship                # also copy the runs into the package

Each resolution's evaluator is the run of its config (configs/evaluator.py:tiny at 64 px, the
default config at 128 px), keyed by `evaluator_train.run_key`: a shipped run
(fundax/eval/evaluators/<key>, what `--ship` writes) or one trained once into the evaluator
cache (`--cache`, the main job's default ~/.cache/fundax/evaluators); the main job at that
size reads the same run. Held-out phantoms are cases no training set contains (seeds after the
evaluator's training range). Writes bench/results/evaluator_<res>.json: every accuracy beside
its majority rate, QWK and AUROC, the targets and whether each is met, and the training time
(when trained by this call)."""

import argparse
import datetime
import json
import pathlib
import shutil
import sys
import time

from fundax import configlib
from fundax.eval import evaluator as evaluator_lib
from fundax.eval import evaluator_train

CONFIGS = {64: "configs/evaluator.py:tiny", 128: "configs/evaluator.py"}
# Issue 17's targets: held-out key -> (bar at 64 px, bar at 128 px); all "at least".
TARGETS = {
    "laterality_macula_accuracy": (0.99, 0.99),
    "field_accuracy": (0.97, 0.98),
    "quality_qwk": (0.80, 0.85),
    "dr_grade_qwk": (0.60, 0.80),
    "referable_dr_auroc": (0.85, 0.93),
    "amd_stage_auroc": (0.75, 0.85),
    "hypertensive_grade_auroc": (0.75, 0.85),
    "glaucoma_auroc": (0.75, 0.85),
    "dme_auroc": (0.75, 0.85),
}


def _ship(workdir: pathlib.Path) -> None:
  """Copies a finished run's evaluator, held-out table and metrics into the package."""
  target = evaluator_train.SHIPPED / workdir.name
  shutil.rmtree(target, ignore_errors=True)
  shutil.copytree(workdir / "evaluator", target / "evaluator")
  for name in ("heldout.json", "metrics.jsonl"):
    shutil.copy(workdir / name, target / name)
  print(f"shipped {workdir} as {target}")


def judge(resolution: int, cache: pathlib.Path, ship: bool) -> dict:
  """Trains (or reuses) the evaluator of one resolution and scores it against the targets."""
  config = configlib.load_config(CONFIGS[resolution])
  workdir, outputs = evaluator_train.find_run(config, cache)
  start = time.time()
  reused = outputs is not None
  if not reused:
    outputs = evaluator_train.train_evaluator(config, str(workdir))
    if "preempted" in outputs:  # saved at its step: rerunning the benchmark resumes it
      sys.exit(f"{resolution} px: {outputs['unfinished']}")
  if ship and workdir.parent != evaluator_train.SHIPPED:
    _ship(workdir)
  heldout = outputs["heldout_accuracy"]
  column = 0 if resolution == 64 else 1
  targets = {key: {"value": heldout.get(key), "target": bars[column],
                   "met": heldout.get(key, float("nan")) >= bars[column]}
             for key, bars in TARGETS.items()}
  return {
      "benchmark": "independent evaluator on held-out phantoms (issue 17)",
      "command": "python bench/judges.py --resolutions " + str(resolution),
      "date": datetime.date.today().isoformat(),
      "config": CONFIGS[resolution], "run": str(workdir), "reused_cached_run": reused,
      "train_seconds": None if reused else time.time() - start,
      "num_train": config.data.num_train, "num_heldout": config.data.num_heldout,
      "steps": config.optim.total_steps, "batch_size": config.batch_size,
      "heldout": heldout, "targets": targets,
      "readable_in_consistency": list(evaluator_lib.readable_attributes(heldout))}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128],
                      choices=sorted(CONFIGS))
  parser.add_argument("--cache", default="~/.cache/fundax/evaluators")
  parser.add_argument("--out-dir", default="bench/results")
  parser.add_argument("--ship", action="store_true",
                      help="copy each run into fundax/eval/evaluators (what the main job reuses)")
  args = parser.parse_args(argv)
  cache = pathlib.Path(args.cache).expanduser()
  for resolution in args.resolutions:
    result = judge(resolution, cache, args.ship)
    path = pathlib.Path(args.out_dir) / f"evaluator_{resolution}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    met = sum(t["met"] for t in result["targets"].values())
    print(f"{resolution} px: {met}/{len(result['targets'])} targets met -> {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
