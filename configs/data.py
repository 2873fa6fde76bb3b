"""Dataset builds for `fundax data build|preview|stats`.

  fundax data build --config configs/data.py:phantom --data-dir ~/tensorflow_datasets
  fundax data build --config configs/data.py:eyepacs --manual-dir ~/downloads/eyepacs
  fundax data preview --config configs/data.py:phantom_tiny --data-dir /tmp/d --out grid.png
  fundax data stats --config configs/data.py:aptos2019 --data-dir ~/tensorflow_datasets

ARG is a phantom variant (phantom, phantom_tiny, phantom_256, phantom_512) or a real dataset
(eyepacs, aptos2019, idrid, eyeq, odir5k, messidor2). Real datasets are built from the user's
own download (`--manual-dir`); fundax never downloads them.
"""

import ml_collections

from fundax.data.config import data_config


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0  # seed for preview sampling
  c.data = data_config(arg or "phantom")
  return c
