"""The self-contained HTML evaluation report: one file, images and plots embedded as base64 PNG.

Sections: a banner saying the images are synthetic; the metric table, each figure beside what
phantoms score and what its negative control scores; the Selector's score (when given) with its
agreement with the independent judges, so a reader sees at once whether the reward the
generator was optimised against agrees with measures it never saw; the evaluator's own
held-out scores (accuracy beside the majority rate); sample grids per prompt
(stamped SYNTHETIC by `fundax.images.make_grid`); per-attribute consistency confusion matrices; the
privacy audit's closest generated/training pairs side by side; distribution plots (vessel
fraction of generated images and phantoms, and the Selector's scores split by whether the
evaluator sees the prompt honoured); then sections the caller adds, such as the main job's
RLHF rounds (`rlhf_section`).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: the report is written by jobs without a display
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
from PIL import Image

from fundax import images as images_lib
from fundax.data import labels as labels_lib

_CLASS_NAMES = {"dr_grade": [str(i) for i in range(5)], "dme": ["no", "yes"],
                "amd_stage": [str(i) for i in range(4)],
                "hypertensive_grade": [str(i) for i in range(5)],
                "quality": list(labels_lib.QUALITIES), "laterality": list(labels_lib.LATERALITIES),
                "field": list(labels_lib.FIELDS), "glaucoma": ["no", "yes"]}
_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse}td,th{border:1px solid #999;padding:3px 8px;text-align:left}
.banner{background:#a00;color:#fff;padding:8px;font-weight:bold}
.pair{display:inline-block;margin:6px;text-align:center;font-size:small}"""


def png_base64(image: Image.Image) -> str:
  """A PIL image as a data: URI."""
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_file_base64(path: str | os.PathLike) -> str:
  """A PNG (or any image) file as a data: URI."""
  with Image.open(path) as image:
    return png_base64(image)


def figure_base64(fig) -> str:
  """A matplotlib figure as a data: URI (the figure is closed)."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
  plt.close(fig)
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
  return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _fmt(value) -> str:
  if isinstance(value, float):
    return "n/a" if math.isnan(value) else f"{value:.4g}"
  return html.escape(str(value))


def metric_table(rows: Sequence[Mapping]) -> str:
  """HTML table of the evaluation rows: value | phantoms | negative control.

  "phantoms" is what real (phantom) images score on the same number of images: the floor of a
  distance, the ceiling of an agreement. The control is a known failure the metric must
  separate from it ("separated": it scores clearly worse).
  """
  head = ("<tr><th>metric</th><th>generated</th><th>phantoms (floor / ceiling)</th>"
          "<th>negative control</th><th>control separated</th><th>better</th>"
          "<th>measured by</th></tr>")
  body = "".join(
      f"<tr><td>{html.escape(r['metric'])}</td><td><b>{_fmt(r['generated'])}</b></td>"
      f"<td>{_fmt(r['phantoms'])}</td><td>{_fmt(r['control'])} "
      f"({html.escape(r['control_set'])})</td><td>{'yes' if r['separated'] else 'NO'}</td>"
      f"<td>{html.escape(r['better'])}</td><td>{html.escape(r['measured_by'])}</td></tr>"
      for r in rows)
  return f"<table>{head}{body}</table>"


def c2st_line(c2st: Mapping) -> str:
  """The two-sample tests' accuracies with their 95% (Wilson) intervals, one per set."""
  parts = [f"{html.escape(name)} {_fmt(r['accuracy'])} [{_fmt(r['ci95'][0])}, "
           f"{_fmt(r['ci95'][1])}] (n = {r['n']})" for name, r in c2st.items()]
  return ("<p>C2ST, a classifier telling prompt-matched phantoms from each set (0.5 = "
          "indistinguishable; 95% intervals): " + "; ".join(parts) + "</p>")


def selector_table(selector: Mapping) -> str:
  """The Selector's mean score and its Spearman with each independent per-image measure."""
  body = "".join(f"<tr><td>{html.escape(name)}</td><td>{_fmt(rho)}</td></tr>"
                 for name, rho in selector["spearman"].items())
  return (f"<p>Selector score (the generator's own reward), mean: {_fmt(selector['mean'])}. "
          "Its agreement with the independent judges (Spearman over images):</p>"
          f"<table><tr><th>independent measure</th><th>Spearman</th></tr>{body}</table>")


def _by_grade(heldout: Mapping[str, float], name: str) -> str:
  """'1: 0.53, 2: 0.49, ...': a graded head's AUROC of each grade alone against grade 0."""
  grades = sorted(int(k.rsplit("_", 1)[1]) for k in heldout
                  if k.startswith(f"{name}_auroc_") and k.rsplit("_", 1)[1].isdigit())
  return ", ".join(f"{g}: {_fmt(heldout[f'{name}_auroc_{g}'])}" for g in grades)


def evaluator_table(heldout: Mapping[str, float], readable: Sequence[str]) -> str:
  """The evaluator's own held-out phantom scores, each accuracy beside its majority rate."""
  if not heldout:
    return "<p>The evaluator's held-out scores are not recorded.</p>"
  names = sorted({k.rsplit("_", 1)[0] for k in heldout if k.endswith("_accuracy")})
  body = "".join(
      f"<tr><td>{html.escape(n)}</td><td>{_fmt(heldout.get(f'{n}_accuracy', math.nan))}</td>"
      f"<td>{_fmt(heldout.get(f'{n}_majority', math.nan))}</td>"
      f"<td>{_fmt(heldout.get(f'{n}_qwk', math.nan))}</td>"
      f"<td>{_fmt(heldout.get(f'{n}_auroc', math.nan))}</td>"
      f"<td>{html.escape(_by_grade(heldout, n))}</td></tr>" for n in names)
  extra = ", ".join(f"{k} {_fmt(heldout[k])}" for k in (
      "referable_dr_auroc", "glaucoma_auroc", "laterality_macula_accuracy", "cdr_mae")
                    if k in heldout)
  return (f"<table><tr><th>attribute</th><th>accuracy</th><th>majority rate</th><th>QWK</th>"
          f"<th>AUROC (any vs none)</th><th>AUROC by grade (g vs none)</th></tr>{body}</table>"
          f"<p>{html.escape(extra)}. Scored in consistency at this size: "
          f"{html.escape(', '.join(readable) or 'all')}.</p>")


def confusion_figure(name: str, confusion) -> str:
  """Heatmap of one attribute's confusion matrix (rows: asked for, columns: evaluator)."""
  m = np.asarray(confusion)
  names = _CLASS_NAMES.get(name, [str(i) for i in range(len(m))])
  fig, ax = plt.subplots(figsize=(3.2, 3.0))
  ax.imshow(m, cmap="Blues")
  for (i, j), v in np.ndenumerate(m):
    ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
  ax.set_xticks(range(len(m)), names)
  ax.set_yticks(range(len(m)), names)
  ax.set_xlabel("evaluator predicts")
  ax.set_ylabel("prompt asks for")
  ax.set_title(name)
  return figure_base64(fig)


def histogram_figure(title: str, series: Mapping[str, Sequence[float]], xlabel: str,
                     threshold: float | None = None) -> str:
  """Overlaid histograms of named value series, with an optional threshold line."""
  fig, ax = plt.subplots(figsize=(4.5, 3.0))
  for label, values in series.items():
    ax.hist(np.asarray(values, float), bins=20, alpha=0.6, label=label)
  if threshold is not None:
    ax.axvline(threshold, color="red", linestyle="--", label="flag threshold")
  ax.set_xlabel(xlabel)
  ax.set_title(title)
  ax.legend(fontsize=7)
  return figure_base64(fig)


def prompt_grids(images, prompts: Sequence[str], max_prompts: int = 8, tile: int = 128) -> list:
  """One SYNTHETIC-stamped grid per prompt (first `max_prompts` prompts), as data URIs."""
  groups: dict[str, list[int]] = {}
  for i, p in enumerate(prompts):
    groups.setdefault(p, []).append(i)
  uris = []
  for prompt, idx in list(groups.items())[:max_prompts]:
    grid = images_lib.make_grid([images[i] for i in idx],
                                [f"sample {k}" for k in range(len(idx))], synthetic=True,
                                columns=min(4, len(idx)), tile=tile, title=prompt,
                                caption_lines=1)
    uris.append((prompt, png_base64(grid)))
  return uris


def closest_pairs_html(pairs, generated, training, tile: int = 200) -> str:
  """Side-by-side thumbnails of (generated, nearest training) pairs with their distance."""
  cells = []
  for g, t, dist in pairs:
    grid = images_lib.make_grid([generated[g], training[t]], ["generated", "training"],
                                synthetic=[True, False], columns=2, tile=tile, caption_lines=1)
    cells.append(f'<div class="pair">{_img(png_base64(grid), "closest pair")}<br>'
                 f"generated #{g} vs training #{t}: RMS {dist:.4f}</div>")
  return "".join(cells)


def rlhf_section(history: Sequence[Mapping], *, best_round: int, stop_reason: str,
                 curves: str, curves_queries: str, grid_before: str, grid_after: str) -> str:
  """The main job's RLHF section of the report: the guard's verdict, every round's Selector
  reward beside its held-out metrics, the curves and the before/after grids.

  Args:
    history: the RLHF run's rounds (`fundax.rl.rounds`' report.json "history"), round 0
      first: each with "round", "reward", "composite", "metrics" (name -> value) and
      optionally "queries" (cumulative Selector queries).
    best_round: the round the guard kept (whose model the report's samples come from).
    stop_reason: why the guard stopped the rounds ("" when it did not).
    curves, curves_queries: PNGs of the reward and composite per round and per query.
    grid_before, grid_after: PNGs of the held-out prompts at round 0 and at the kept round.

  Returns:
    An HTML section for `render(sections=...)`.
  """
  head = "".join(f"<th>{html.escape(k)}</th>" for k in history[0]["metrics"])
  rows = "".join(
      f"<tr><td>{h['round']}</td><td>{h.get('queries', 0)}</td><td>{h['reward']:.4f}</td>"
      f"<td>{h['composite']:.4f}</td>"
      + "".join(f"<td>{v:.4f}</td>" for v in h["metrics"].values()) + "</tr>" for h in history)
  guard = html.escape(stop_reason or "no reward hacking detected")
  images = "".join(f"<p>{html.escape(alt)}</p>{_img(png_file_base64(path), alt)}" for path, alt in (
      (curves, "Selector reward and held-out composite per round"),
      (curves_queries, "the same against cumulative Selector queries"),
      (grid_before, "held-out prompts before RLHF (round 0)"),
      (grid_after, f"held-out prompts at the kept round {best_round}")))
  return (f"<h2>RLHF: {len(history) - 1} rounds, kept round {best_round}</h2>"
          "<p>Samples above come from the kept model. The Selector's reward (its own score, "
          "which the rounds optimise) is shown beside the independent evaluator's held-out "
          f"metrics, which the guard watches: {guard}.</p>"
          "<table><tr><th>round</th><th>Selector queries</th><th>Selector reward</th>"
          f"<th>held-out composite</th>{head}</tr>{rows}</table>{images}")


def render(metrics: Mapping, *, images, prompts: Sequence[str], training_images,
           title: str = "fundax evaluation report", sections: Sequence[str] = ()) -> str:
  """Builds the report HTML from the metrics dict of `run.evaluate` and the images.

  Args:
    metrics: the dict `run.evaluate` writes to metrics.json.
    images: [N, H, W, 3] generated images.
    prompts: their N prompts.
    training_images: [M, H, W, 3] the reference/training images of the privacy audit.
    title: page title.
    sections: HTML sections (trusted: built by fundax) appended after the distributions.

  Returns:
    The HTML document.
  """
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{_STYLE}</style></head><body>",
           f"<div class='banner'>{html.escape(images_lib.SYNTHETIC_BANNER)}</div>",
           f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(metrics.get('note', ''))}</p>",
           "<h2>Metrics</h2>", metric_table(metrics["table"])]
  if metrics.get("c2st"):
    parts.append(c2st_line(metrics["c2st"]))
  if metrics.get("selector"):
    parts.append(selector_table(metrics["selector"]))
  parts.append("<h2>The evaluator on held-out phantoms</h2>")
  parts.append(evaluator_table(metrics.get("evaluator_heldout", {}),
                               metrics.get("readable", ())))

  parts.append("<h2>Samples per prompt</h2>")
  for prompt, uri in prompt_grids(images, prompts):
    parts.append(f"<p>{html.escape(prompt)}</p>{_img(uri, prompt)}")

  consistency = metrics.get("consistency", {})
  parts.append("<h2>Text-image consistency (rows: prompt, columns: independent evaluator)</h2>")
  for name, entry in consistency.items():
    if isinstance(entry, Mapping) and "confusion" in entry:
      parts.append(_img(confusion_figure(name, entry["confusion"]), name))

  privacy = metrics.get("privacy")
  if privacy:
    parts.append(f"<h2>Privacy: closest generated / training pairs</h2><p>"
                 f"{privacy['num_flagged']} of {len(privacy['flagged'])} generated images "
                 f"flagged as near-copies.</p>")
    parts.append(closest_pairs_html(privacy["closest_pairs"], images, training_images))
    parts.append(_img(histogram_figure(
        "nearest training image", {"generated": privacy["pixel_rms"]}, "pixel RMS distance",
        threshold=metrics.get("config", {}).get("pixel_threshold")), "privacy histogram"))

  parts.append("<h2>Distributions</h2>")
  sets = metrics.get("sets", {})
  vessels = {name: sets[name]["anatomy"]["vessel_fraction"] for name in ("generated", "phantoms")
             if "anatomy" in sets.get(name, {})}
  if vessels:
    parts.append(_img(histogram_figure("vessel fraction", vessels,
                                       "fraction of the FOV detected as vessel"),
                      "vessel fraction"))
  selector = metrics.get("selector")
  if selector:
    # A Selector that still tracks what the independent evaluator sees scores the images that
    # agree with their prompt higher.
    agree = np.asarray(consistency.get("per_image_agree", []), bool)
    scores = np.asarray(selector["scores"], float)
    parts.append(_img(histogram_figure(
        "Selector score by independent prompt agreement",
        {"evaluator: agrees": scores[agree], "evaluator: disagrees": scores[~agree]},
        "Selector score"), "Selector score histogram"))
  parts.extend(sections)
  parts.append("</body></html>")
  return "\n".join(parts)
