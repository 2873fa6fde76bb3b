"""Dataset previews: a labelled grid of randomly chosen examples of any fundax dataset.

Tiles carry their captions; synthetic examples (phantoms) are stamped as such by
`fundax.images.make_grid`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from fundax import images


def preview_source(source, *, num_images: int = 16, seed: int = 0, columns: int = 4,
                   tile: int = 256, title: str | None = None) -> Image.Image:
  """A labelled grid of randomly chosen examples of a fundax dataset.

  Args:
    source: a data source of any fundax dataset (`fundax.data.datasets.load`).
    num_images: how many examples to show (fewer if the split is smaller).
    seed: which examples are drawn.
    columns: tiles per row.
    tile: tile size in pixels.
    title: optional line above the grid.

  Returns:
    The grid as a PIL image; synthetic examples are stamped as such.
  """
  from fundax.data.builders import features  # pylint: disable=g-import-not-at-top
  if len(source) == 0:
    raise ValueError("the split is empty: nothing to preview")
  rng = np.random.default_rng(seed)
  picks = np.sort(rng.choice(len(source), size=min(num_images, len(source)), replace=False))
  examples = [features.decode_example(source[int(i)]) for i in picks]
  return images.make_grid([e["image"] for e in examples],
                          [f"[{e['id']}] {e['caption']}" for e in examples],
                          synthetic=[e["synthetic"] for e in examples],
                          columns=columns, tile=tile, title=title)
