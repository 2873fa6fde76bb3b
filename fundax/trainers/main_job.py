"""The main job on the embedded default: the phantom dataset, its statistics and a preview.

Later stages of fundax (diffusion training, Selector, RLHF, evaluation) extend this job; each
stage reuses what an earlier (possibly interrupted) run already wrote in the workdir.
"""

from __future__ import annotations

import json
import logging
import pathlib

import ml_collections

from fundax.data import datasets, preview


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """Runs the main job.

  Args:
    config: a config from configs/main.py.
    workdir: output directory; created if missing. A rerun reuses the built dataset.

  Returns:
    Output name -> path, for the CLI to print.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  data = config.data.copy_and_resolve_references()  # the caller's config stays as given
  data.data_dir = data.data_dir or str(workdir / "data")

  logging.info("building %s in %s", data.name, data.data_dir)
  build = datasets.build_from_config(data)
  stats = datasets.stats_from_config(data)
  stats_path = workdir / "data_stats.json"
  stats_path.write_text(json.dumps({"build": build, "stats": stats}, indent=2))

  source = datasets.load_from_config(data, config.preview.split)
  grid = preview.preview_source(
      source, num_images=config.preview.num_images, seed=config.seed,
      columns=config.preview.columns, tile=config.preview.tile,
      title=f"fundax phantom, {data.resolution} px, split {config.preview.split}")
  preview_path = workdir / "preview.png"
  grid.save(preview_path)
  return {"dataset": build["data_dir"], "stats": str(stats_path), "preview": str(preview_path)}
