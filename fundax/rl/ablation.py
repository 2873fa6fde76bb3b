"""The ablation of the two stages on the same reward budget (number of Selector queries).

Three arms, each a full `rounds.run` in `<workdir>/<arm>` with the same rounds and the same
number of scored batches per round (so the same Selector queries):

  rwr_only   threshold-then-finetune only: every batch goes to stage 2 (reward-weighted
             regression on the candidates above the Selector's threshold), the literal reading
             of active selection;
  ddpo_only  stage 1 only: every batch goes to the DDPO policy gradient;
  both       the loop as configured (stage 1 then stage 2).

The Selector is fixed in every arm (no feedback retraining), so the arms optimise the same
reward; the guard is on as configured. Writes `ablation.json`, `ablation.md` (the table) and
`curves.png` (held-out Selector reward and composite against cumulative queries).
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=wrong-import-position

from fundax import sampling  # pylint: disable=wrong-import-position
from fundax.rl import reward as reward_lib  # pylint: disable=wrong-import-position
from fundax.rl import rounds  # pylint: disable=wrong-import-position

log = logging.getLogger(__name__)

ARMS = ("rwr_only", "ddpo_only", "both")


def arm_config(config: ml_collections.ConfigDict, arm: str) -> ml_collections.ConfigDict:
  """The config of one arm: the same scored batches per round, routed to its stages."""
  if arm not in ARMS:
    raise ValueError(f"unknown ablation arm {arm!r}; known: {', '.join(ARMS)}")
  c = config.copy_and_resolve_references()
  batches = c.stage1.iterations + c.stage2.iterations
  if arm == "rwr_only":
    c.stage1.iterations, c.stage2.iterations = 0, batches
  elif arm == "ddpo_only":
    c.stage1.iterations, c.stage2.iterations = batches, 0
  c.feedback.enabled = False
  c.feedback.retrain_selector = False
  return c


def _table(results: dict[str, dict[str, Any]]) -> str:
  """One row per arm: Selector reward and composite before, after the last round and at the
  kept round (the model the arm hands on), then the kept round's held-out metrics."""
  metric_names = list(next(iter(results.values()))["heldout_kept"])
  head = ["arm", "queries", "Selector reward before", "last", "kept", "composite before", "last",
          "kept", "kept round", "guard stopped", *(f"{m} (kept)" for m in metric_names)]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for arm, r in results.items():
    cells = [arm, str(r["queries"]),
             *(f"{r[f'{name}_{when}']:.4f}" for name in ("reward", "composite")
               for when in ("before", "after", "kept")),
             str(r["best_round"]), str(r["stopped"]),
             *(f"{r['heldout_kept'][m]:.4f}" for m in metric_names)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _plot(histories: dict[str, list], path: pathlib.Path) -> str:
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for arm, history in histories.items():
    queries = [h["queries"] for h in history]
    axes[0].plot(queries, [h["reward"] for h in history], "o-", label=arm)
    axes[1].plot(queries, [h["composite"] for h in history], "o-", label=arm)
  axes[0].set(title="held-out Selector reward", xlabel="Selector queries")
  axes[1].set(title="held-out composite (independent)", xlabel="Selector queries")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return str(path)


def run(config: ml_collections.ConfigDict, workdir: str, *, reward_fn=None,
        heldout_fn=None) -> dict[str, Any]:
  """Runs (or resumes) every arm of `config.ablation.arms` and writes the comparison.

  Args:
    config: a configs/rlhf.py config.
    workdir: output directory (one sub-directory per arm).
    reward_fn: the shared reward (default: the one `config.reward` names, built once).
    heldout_fn: the shared held-out evaluation (default: the independent evaluator).

  Returns:
    Output name -> path, and "results": arm -> that arm's `rounds.run` figures.
  """
  rounds.check_config(config, need_selector=reward_fn is None,
                      need_evaluator=heldout_fn is None)
  arms = tuple(config.ablation.arms)
  for arm in arms:
    arm_config(config, arm)  # unknown arms fail before any compute
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if reward_fn is None:
    reward_fn = reward_lib.make_reward(config)
  if heldout_fn is None:
    models = sampling.load_pipeline(config.ldm_checkpoint).models
    resolution = models.latent_shape[0] * models.vae.config.downsample_factor
    training, _ = rounds.phantom_pool(config.stage2.pretrain_pool, resolution,
                                      config.stage2.pretrain_seed, config.seed)
    heldout_fn = rounds.make_heldout_evaluator(config, resolution, training)
  results, histories = {}, {}
  for arm in arms:
    log.info("ablation arm %s", arm)
    out = rounds.run(arm_config(config, arm), str(workdir / arm), reward_fn=reward_fn,
                     heldout_fn=heldout_fn)
    if "preempted" in out:  # the arm saved its stage; a rerun resumes it (and reuses the rest)
      return {"workdir": str(workdir), "unfinished": f"arm {arm}: {out['unfinished']}",
              "preempted": out["preempted"]}
    results[arm] = out
    histories[arm] = json.loads(pathlib.Path(out["report_json"]).read_text())["history"]
  table = _table(results)
  (workdir / "ablation.md").write_text(table, encoding="utf-8")
  (workdir / "ablation.json").write_text(json.dumps(
      {"arms": {arm: {"history": histories[arm], **{k: v for k, v in r.items()
                                                    if not isinstance(v, str)}}
                for arm, r in results.items()}}, indent=2, default=float))
  return {"workdir": str(workdir), "table": str(workdir / "ablation.md"),
          "json": str(workdir / "ablation.json"),
          "curves": _plot(histories, workdir / "curves.png"), "results": results}
