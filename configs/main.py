"""The main job on the embedded default: build the phantom fundus dataset, write a preview.

  fundax main --config configs/main.py --workdir runs/main          # 128 px, 2560 images
  fundax main --config configs/main.py:tiny --workdir runs/tiny     # 64 px, 48 images (CPU demo)

Expect `<workdir>/data/` (TFDS array_record dataset), `<workdir>/preview.png` (a labelled grid
of synthetic images with their captions) and `<workdir>/data_stats.json`.
"""

import ml_collections

from fundax.data.config import data_config


def get_config(arg=None):
  variant = arg or "default"
  if variant not in ("default", "tiny"):
    raise ValueError(f"configs/main.py variants: default, tiny; got {variant!r}")
  c = ml_collections.ConfigDict()
  c.seed = 0  # root seed of the job
  c.data = data_config("phantom_tiny" if variant == "tiny" else "phantom")
  c.preview = ml_collections.ConfigDict()
  c.preview.split = "train"  # split shown in the preview grid
  c.preview.num_images = 8 if variant == "tiny" else 16  # tiles in the grid
  c.preview.columns = 4  # tiles per row
  c.preview.tile = 256  # tile size, px
  return c
