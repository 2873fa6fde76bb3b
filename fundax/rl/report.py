"""The RLHF report: Selector reward and held-out curves, before/after grids, JSON and HTML.

The curves put the two views of each round side by side: the Selector's reward (what the loop
optimises; held-out prompts and training batches) against the independent held-out metrics
and their composite (what the guard watches), on the round axis and on the axis of
cumulative reward queries. The grids show the held-out prompts' images before RL (round 0)
and at the kept (best) round, every tile stamped SYNTHETIC.
"""

from __future__ import annotations

import html
import json
import logging
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from PIL import Image  # pylint: disable=wrong-import-position

from fundax import images as images_lib  # pylint: disable=wrong-import-position
from fundax.eval import report as eval_report  # pylint: disable=wrong-import-position

log = logging.getLogger(__name__)


def _fmt(value) -> str:
  value = float(value)
  return "n/a" if math.isnan(value) else f"{value:.4g}"


def _series(history: Sequence[Mapping[str, Any]], key: str) -> list[float]:
  out = []
  for h in history:
    value = h.get(key, h.get("metrics", {}).get(key))
    out.append(float("nan") if value is None else float(value))
  return out


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | pathlib.Path, *,
                x: str = "round", title: str = "RLHF") -> str:
  """Writes the reward and held-out curves as one PNG.

  Args:
    history: the evaluated rounds (see `rounds.run`).
    path: PNG file to write.
    x: "round" or "queries" (cumulative Selector queries).
    title: figure title.

  Returns:
    The path written.
  """
  xs = _series(history, x)
  metric_names = list(history[0].get("metrics", {})) if history else []
  panels = 2 + len(metric_names)
  cols = min(panels, 4)
  rows = math.ceil(panels / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
  axes = axes.ravel()
  ax = axes[0]
  ax.plot(xs, _series(history, "reward"), "o-", label="held-out prompts")
  ax.plot(xs, _series(history, "train_reward"), "s--", label="training batches")
  ax.set(title="Selector reward (optimised)", xlabel=x)
  ax.legend(fontsize=7)
  ax = axes[1]
  ax.plot(xs, _series(history, "composite"), "o-", color="tab:green")
  ax.set(title="held-out composite (independent)", xlabel=x)
  for ax, name in zip(axes[2:], metric_names):
    ax.plot(xs, _series(history, name), "o-", color="tab:purple")
    ax.set(title=f"held-out {name}", xlabel=x)
  for ax in axes[panels:]:
    ax.axis("off")
  fig.suptitle(title)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return str(path)


def write_report(out_dir: str | pathlib.Path, summary: Mapping[str, Any], *,
                 before: tuple[Any, Sequence[str]], after: tuple[Any, Sequence[str]]
                 ) -> dict[str, str]:
  """Writes curves, grids, report.json and report.html into `out_dir`.

  Args:
    out_dir: output directory (created).
    summary: JSON-able: "history" (evaluated rounds), "best_round", "stopped", "stop_reason"
      and whatever else the caller adds.
    before: (images, prompts) of the held-out prompts before RL.
    after: the same at the kept round.

  Returns:
    Output name -> path.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  history = summary["history"]
  best = summary["best_round"]
  paths = {
      "curves": plot_curves(history, out / "curves.png", title="Selector reward vs held-out"),
      "curves_queries": plot_curves(history, out / "curves_queries.png", x="queries",
                                    title="vs cumulative Selector queries"),
      "grid_before": images_lib.save_grid(
          out / "grid_before.png", *before, synthetic=True, columns=4, tile=128,
          title="SYNTHETIC: held-out prompts before RLHF (round 0)"),
      "grid_after": images_lib.save_grid(
          out / "grid_after.png", *after, synthetic=True, columns=4, tile=128,
          title=f"SYNTHETIC: held-out prompts at the kept round {best}"),
  }
  json_path = out / "report.json"
  json_path.write_text(json.dumps({**summary, "files": paths}, indent=2, default=float))
  rows = "".join(
      f"<tr><td>{h['round']}</td><td>{h.get('queries', 0)}</td><td>{_fmt(h['reward'])}</td>"
      f"<td>{_fmt(h['composite'])}</td>"
      + "".join(f"<td>{_fmt(v)}</td>" for v in h["metrics"].values()) + "</tr>"
      for h in history)
  head = "".join(f"<th>{html.escape(k)}</th>" for k in history[0]["metrics"])
  stop = summary.get("stop_reason") or "no reward hacking detected"

  def img(name):
    with Image.open(paths[name]) as image:
      return f'<img src="{eval_report.png_base64(image)}" alt="{name}">'

  page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fundax RLHF report</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 8px;text-align:right}}
img{{max-width:100%}}</style></head><body>
<h1>fundax RLHF report</h1>
<p><b>All images are SYNTHETIC</b> (generated by fundax). Kept checkpoint: round {best}.
Guard: {html.escape(stop)}.</p>
<h2>Selector reward vs independent held-out metrics</h2>{img("curves")}{img("curves_queries")}
<table><tr><th>round</th><th>queries</th><th>Selector reward</th><th>composite</th>{head}</tr>
{rows}</table>
<h2>Before and after (held-out prompts)</h2>{img("grid_before")}{img("grid_after")}
</body></html>"""
  html_path = out / "report.html"
  html_path.write_text(page, encoding="utf-8")
  log.info("wrote %s and %s", json_path, html_path)
  return {**paths, "report_json": str(json_path), "report_html": str(html_path)}
