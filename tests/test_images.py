"""The PNG quantiser, the SYNTHETIC stamp and labelled grids (fundax.images)."""

import numpy as np
from PIL import Image

from fundax import images

RED = np.array(images.STAMP_COLOUR)


def _red_fraction(pixels: np.ndarray) -> float:
  return float((np.abs(pixels.astype(int) - RED).sum(-1) < 10).mean())


def test_quantiser_rounds_to_nearest_and_saturates():
  x = np.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0], np.float32)
  np.testing.assert_array_equal(images.to_uint8(x), [0, 0, 64, 128, 191, 255, 255])
  pixels = np.arange(256, dtype=np.uint8)
  assert images.to_uint8(pixels) is pixels  # already quantised
  # A PNG-quantised image survives another round trip unchanged.
  np.testing.assert_array_equal(images.to_uint8(pixels.astype(np.float32) / 127.5 - 1), pixels)


def test_save_pngs_writes_what_the_quantiser_gives(tmp_path):
  x = np.random.default_rng(0).uniform(-1.2, 1.2, (3, 8, 8, 3)).astype(np.float32)
  paths = images.save_pngs(x, tmp_path / "out", "{:04d}.png")
  assert [p.rsplit("/", 1)[1] for p in paths] == ["0000.png", "0001.png", "0002.png"]
  for path, expected in zip(paths, images.to_uint8(x)):
    np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)


def test_grid_stamps_synthetic_tiles_and_carries_the_banner(tmp_path):
  grey = np.zeros((2, 16, 16, 3), np.float32)
  path = images.save_grid(tmp_path / "g" / "grid.png", grey, ["synthetic", "real"],
                          synthetic=[True, False], columns=2, tile=64, caption_lines=1)
  grid = np.asarray(Image.open(path))
  header = grid.shape[0] - (64 + 1 * 13 + 6)  # one row: tile + one caption line
  assert grid.shape[1] == 128 and header > 0
  assert _red_fraction(grid[:header]) > 0  # the banner's red text
  assert _red_fraction(grid[header:header + 16, 2:40]) > 0.3  # stamp on the synthetic tile
  assert _red_fraction(grid[header:header + 64, 64:]) == 0  # none on the real one
  plain = np.asarray(images.make_grid(grey[:1], ["real"], synthetic=False, tile=64,
                                      caption_lines=1))
  assert _red_fraction(plain) == 0 and plain.shape[0] == 64 + 19  # no banner either
