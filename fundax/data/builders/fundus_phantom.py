"""`fundus_phantom`: the procedural fundus world (`fundax.data.phantom`) as a TFDS dataset.

Every example is `phantom.generate(seed, resolution)` for a seed fixed by (split, index), so a
dataset can be rebuilt bit for bit and any example regenerated from its id alone. The splits
draw from disjoint seed ranges (`split_seed`), so no scene appears in two splits.

Standard configs are named `r<resolution>_n<train size>` (r64_n256, r128_n2k, r256_n10k,
r512_n10k; validation and test are each an eighth or a tenth of train), with `_masks` when the
per-pixel anatomy/lesion masks are stored too. Tests and demos that need other sizes build
one on the fly with `phantom_builder(...)`; its config name (`r64_t32_v8_e8_masks`) encodes
every parameter, so `config_from_name` can rebuild the config when the dataset is loaded again.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import re

import tensorflow_datasets as tfds

from fundax.data import phantom
from fundax.data.builders import features

SPLITS = ("train", "validation", "test")
# Split s, example i uses seed SPLIT_SEED_BASE[s] + i: ranges of 10^9 seeds never overlap.
SPLIT_SEED_BASE = {"train": 0, "validation": 1_000_000_000, "test": 2_000_000_000}
MAX_SPLIT_SIZE = 1_000_000_000
_CUSTOM_NAME = re.compile(r"^r(\d+)_t(\d+)_v(\d+)_e(\d+)(_masks)?$")


def split_seed(split: str, index: int) -> int:
  """The phantom seed of example `index` of `split`.

  Args:
    split: "train", "validation" or "test".
    index: position of the example in its split, 0-based.

  Returns:
    The seed passed to `phantom.generate`.
  """
  if split not in SPLIT_SEED_BASE:
    raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
  if not 0 <= index < MAX_SPLIT_SIZE:
    raise ValueError(f"index must be in [0, {MAX_SPLIT_SIZE}), got {index}")
  return SPLIT_SEED_BASE[split] + index


def example_id(seed: int) -> str:
  """The "id" feature of the phantom example drawn from `seed`."""
  return f"phantom-{seed:010d}"


@dataclasses.dataclass(eq=False)
class PhantomConfig(tfds.core.BuilderConfig):
  """Resolution, split sizes and whether masks are stored."""

  resolution: int = 128
  num_train: int = 0
  num_val: int = 0
  num_test: int = 0
  with_masks: bool = False


def make_config(
    resolution: int,
    num_train: int,
    num_val: int,
    num_test: int,
    with_masks: bool = False,
    name: str | None = None,
) -> PhantomConfig:
  """A phantom config; unnamed configs get a name that encodes every parameter.

  Args:
    resolution: image side in pixels.
    num_train: number of training examples.
    num_val: number of validation examples.
    num_test: number of test examples.
    with_masks: also store the masks of `phantom.MASK_NAMES`.
    name: config name; default `r<res>_t<train>_v<val>_e<test>[_masks]`.

  Returns:
    The `PhantomConfig`.
  """
  for n in (num_train, num_val, num_test):
    if not 0 <= n < MAX_SPLIT_SIZE:
      raise ValueError(f"split sizes must be in [0, {MAX_SPLIT_SIZE}), got {n}")
  if name is None:
    name = f"r{resolution}_t{num_train}_v{num_val}_e{num_test}" + ("_masks" if with_masks else "")
  masks = "with masks" if with_masks else "without masks"
  return PhantomConfig(
      name=name,
      description=f"{resolution}px, {num_train}/{num_val}/{num_test} train/val/test, {masks}",
      resolution=resolution,
      num_train=num_train,
      num_val=num_val,
      num_test=num_test,
      with_masks=with_masks,
  )


def _standard_configs() -> list[PhantomConfig]:
  configs = []
  for resolution, tag, sizes, mask_variants in (
      (64, "n256", (256, 32, 32), (False, True)),
      (128, "n2k", (2048, 256, 256), (False, True)),
      (256, "n10k", (10000, 1000, 1000), (False, True)),
      # 512px masks would triple the dataset for little gain over upsampled 256px masks.
      (512, "n10k", (10000, 1000, 1000), (False,)),
  ):
    for with_masks in mask_variants:
      name = f"r{resolution}_{tag}" + ("_masks" if with_masks else "")
      configs.append(make_config(resolution, *sizes, with_masks, name))
  return configs


STANDARD_CONFIGS = _standard_configs()


def config_from_name(name: str) -> PhantomConfig:
  """The standard config called `name`, or the custom one whose name encodes its parameters.

  Args:
    name: a standard name (e.g. "r128_n2k") or a `make_config` name (e.g. "r64_t32_v8_e8").

  Returns:
    The `PhantomConfig`.
  """
  for config in STANDARD_CONFIGS:
    if config.name == name:
      return config
  match = _CUSTOM_NAME.match(name)
  if match is None:
    known = ", ".join(c.name for c in STANDARD_CONFIGS)
    raise ValueError(
        f"unknown fundus_phantom config {name!r}; known: {known}, or r<res>_t<n>_v<n>_e<n>[_masks]")
  res, n_train, n_val, n_test = (int(g) for g in match.groups()[:4])
  return make_config(res, n_train, n_val, n_test, bool(match.group(5)))


def find_config(
    resolution: int, num_train: int, num_val: int, num_test: int, with_masks: bool = False
) -> PhantomConfig:
  """The standard config with these sizes, else a custom one (`make_config`).

  Sizes that match a standard config reuse it rather than writing a copy under another name.

  Args:
    resolution: image side in pixels.
    num_train: number of training examples.
    num_val: number of validation examples.
    num_test: number of test examples.
    with_masks: also store the masks.

  Returns:
    The `PhantomConfig`.
  """
  params = (resolution, num_train, num_val, num_test, with_masks)
  for config in STANDARD_CONFIGS:
    if (config.resolution, config.num_train, config.num_val, config.num_test,
        config.with_masks) == params:
      return config
  return make_config(*params)


def make_example(seed: int, resolution: int, with_masks: bool) -> dict:
  """The features of the phantom example drawn from `seed` (module level: run in workers)."""
  sample = phantom.generate(seed, resolution=resolution)
  example = features.make_example(
      example_id(seed), features.encode_png(sample.image), sample.labels, synthetic=True)
  example["record"] = json.dumps(sample.record, sort_keys=True)
  if with_masks:
    example["masks"] = {
        name: features.encode_png(sample.masks[name]) for name in phantom.MASK_NAMES}
  return example


def _make_example_star(args) -> dict:
  return make_example(*args)


class FundusPhantom(tfds.core.GeneratorBasedBuilder):
  """Synthetic fundus photographs with exact labels, captions and masks from the phantom."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = STANDARD_CONFIGS

  def __init__(self, *, config: str | PhantomConfig | None = None, num_workers: int = 0,
               **kwargs):
    """Creates the builder.

    Args:
      config: a `PhantomConfig`, or a standard or `make_config` name; None: the first standard.
      num_workers: processes that generate images (0: in this process). The output does not
        depend on it: examples are generated from their seeds and written in index order.
      **kwargs: `tfds.core.GeneratorBasedBuilder` arguments (data_dir, ...).
    """
    # Custom configs are rebuilt from their name, so `load` needs nothing but the name.
    if isinstance(config, str):
      config = config_from_name(config)
    self.num_workers = num_workers
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    res = self.builder_config.resolution
    return self.dataset_info_from_configs(
        description=__doc__,
        features=features.make_features(
            (res, res, 3),
            encoding_format="png",
            with_record=True,
            mask_names=phantom.MASK_NAMES if self.builder_config.with_masks else (),
        ),
        # Keep index order: example i of a split is the one drawn from split_seed(split, i).
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: every image is generated.
    config = self.builder_config
    sizes = {"train": config.num_train, "validation": config.num_val, "test": config.num_test}
    return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

  def _generate_examples(self, split: str, num_examples: int):
    config = self.builder_config
    args = [(split_seed(split, i), config.resolution, config.with_masks)
            for i in range(num_examples)]
    if self.num_workers <= 1:
      yield from enumerate(map(_make_example_star, args))
      return
    # "spawn": forking a process that has initialised JAX or threads can deadlock.
    context = multiprocessing.get_context("spawn")
    with context.Pool(self.num_workers) as pool:
      yield from enumerate(pool.imap(_make_example_star, args, chunksize=4))


def phantom_builder(
    resolution: int,
    num_train: int,
    num_val: int,
    num_test: int,
    with_masks: bool = False,
    data_dir: str | None = None,
    num_workers: int = 0,
) -> FundusPhantom:
  """A `fundus_phantom` builder for a size of your choice (not yet prepared).

  Args:
    resolution: image side in pixels.
    num_train: number of training examples.
    num_val: number of validation examples.
    num_test: number of test examples.
    with_masks: also store the masks.
    data_dir: TFDS data directory (TFDS default when None).
    num_workers: processes that generate images (0: in this process).

  Returns:
    The builder; call `download_and_prepare()` to write it, `as_data_source(split)` to read it.
  """
  config = find_config(resolution, num_train, num_val, num_test, with_masks)
  return FundusPhantom(config=config, data_dir=data_dir, num_workers=num_workers)
