"""The `data` section shared by job configs: which dataset, where, and at what size.

Job configs (configs/main.py, configs/data.py, and later the trainers) call `data_config(arg)`
so that one dataset description serves every job instead of being copied into each file.
"""

from __future__ import annotations

import ml_collections

# Phantom sizes by variant: (resolution px, train, validation, test images).
PHANTOM_VARIANTS = {
    "phantom": (128, 2048, 256, 256),
    "phantom_tiny": (64, 32, 8, 8),
    "phantom_256": (256, 10000, 1000, 1000),
    "phantom_512": (512, 10000, 1000, 1000),
}

REAL_DATASETS = ("eyepacs", "aptos2019", "idrid", "eyeq", "odir5k", "messidor2")


def data_config(arg: str = "phantom") -> ml_collections.ConfigDict:
  """Returns the data section for a dataset variant.

  Args:
    arg: a phantom variant (`phantom`, `phantom_tiny`, `phantom_256`, `phantom_512`) or a real
      dataset name (`eyepacs`, `aptos2019`, `idrid`, `eyeq`, `odir5k`, `messidor2`), which
      needs `manual_dir` pointing at the user's own download.

  Returns:
    An unlocked ConfigDict (the job config locks the whole config).
  """
  c = ml_collections.ConfigDict()
  if arg in PHANTOM_VARIANTS:
    resolution, n_train, n_val, n_test = PHANTOM_VARIANTS[arg]
    c.name = "fundus_phantom"
  elif arg in REAL_DATASETS:
    resolution, n_train, n_val, n_test = 512, 0, 0, 0
    c.name = arg
  else:
    raise ValueError(
        f"unknown data variant {arg!r}; known: {sorted(PHANTOM_VARIANTS) + list(REAL_DATASETS)}")
  c.data_dir = ""  # where TFDS writes/reads datasets; "" = <workdir>/data or ~/tensorflow_datasets
  c.manual_dir = ""  # the user's own download of a real dataset (unused by the phantom)
  c.resolution = resolution  # phantom render size, px (real images keep theirs until the pipeline)
  c.num_train = n_train  # phantom images in the train split
  c.num_validation = n_val  # phantom images in the validation split
  c.num_test = n_test  # phantom images in the test split
  c.with_masks = True  # phantom: also store vessel/disc/cup/lesion masks
  c.skip_bad = True  # real data: skip (and count, and name) missing/corrupt files instead of failing
  return c
