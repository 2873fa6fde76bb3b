"""The common feature schema and the `fundus_phantom` TFDS builder (build, read back, stats)."""

import json

import numpy as np
import pytest

from fundax.data import captions
from fundax.data import config as data_config
from fundax.data import datasets
from fundax.data import labels as labels_lib
from fundax.data import phantom
from fundax.data.builders import features
from fundax.data.builders import fundus_phantom

RES = 64
SIZES = dict(resolution=RES, num_train=3, num_val=2, num_test=2, with_masks=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  datasets.build("fundus_phantom", path, **SIZES)
  return path


def test_round_trip_equals_phantom_generate(data_dir):
  ids = {}
  for split, n in (("train", 3), ("validation", 2), ("test", 2)):
    source = datasets.load("fundus_phantom", split, data_dir, **SIZES)
    assert len(source) == n
    ids[split] = set()
    for index in range(n):
      ex = features.decode_example(source[index])
      seed = fundus_phantom.split_seed(split, index)
      sample = phantom.generate(seed, resolution=RES)
      assert ex["id"] == fundus_phantom.example_id(seed)
      np.testing.assert_array_equal(ex["image"], sample.image)
      assert ex["labels"] == sample.labels
      assert ex["caption"] == captions.caption(sample.labels, 0)
      assert ex["record"] == json.loads(json.dumps(sample.record))
      assert ex["synthetic"] is True
      assert set(ex["masks"]) == set(phantom.MASK_NAMES)
      for name in phantom.MASK_NAMES:
        np.testing.assert_array_equal(ex["masks"][name], sample.masks[name])
      codes = features.label_codes(sample.labels)
      raw = source[index]
      assert [int(raw[k]) for k in features.SCALAR_NAMES] == [int(codes[k]) for k in codes]
      ids[split].add(ex["id"])
  assert not ids["train"] & ids["validation"]
  assert not ids["train"] & ids["test"] and not ids["validation"] & ids["test"]


def test_stats_counts_and_distributions(data_dir):
  st = datasets.stats("fundus_phantom", data_dir, config="r64_t3_v2_e2_masks")
  assert {s: v["num_examples"] for s, v in st["splits"].items()} == {
      "train": 3, "validation": 2, "test": 2}
  assert st["total"]["synthetic"] == {"true": 7}
  expected = {}
  for split, n in (("train", 3), ("validation", 2), ("test", 2)):
    for index in range(n):
      sample = phantom.generate(fundus_phantom.split_seed(split, index), resolution=RES)
      grade = str(sample.labels.dr_grade)
      expected[grade] = expected.get(grade, 0) + 1
  assert st["total"]["dr_grade"] == expected
  assert st["build_summary"] is None


def test_worker_processes_write_the_same_dataset(data_dir, tmp_path):
  datasets.build("fundus_phantom", str(tmp_path), num_workers=2, **SIZES)
  for split in ("train", "validation", "test"):
    ours = datasets.load("fundus_phantom", split, str(tmp_path), **SIZES)
    reference = datasets.load("fundus_phantom", split, data_dir, **SIZES)
    for a, b in zip(ours, reference, strict=True):
      assert a["id"] == b["id"] and a["record"] == b["record"]
      np.testing.assert_array_equal(a["image"], b["image"])


def test_build_from_job_config(data_dir):
  config = data_config.data_config("phantom_tiny")
  config.data_dir = data_dir
  config.update(resolution=RES, num_train=3, num_validation=2, num_test=2, with_masks=True)
  summary = datasets.build_from_config(config)  # already built: reuses it
  assert summary["splits"] == {"train": 3, "validation": 2, "test": 2}
  assert len(datasets.load_from_config(config, "test")) == 2
  assert datasets.stats_from_config(config)["total"]["num_examples"] == 7
  # The first examples of a split, decoded and resized to floats in [-1, 1], with their labels.
  images, labels = datasets.read_split(config, "train", 5, resolution=16)
  assert images.shape == (3, 16, 16, 3) and images.dtype == np.float32 and len(labels) == 3
  assert -1.0 <= images.min() < images.max() <= 1.0
  assert [l.dr_grade for l in labels] == [phantom.generate(
      fundus_phantom.split_seed("train", i), resolution=RES).labels.dr_grade for i in range(3)]


def test_split_seeds_are_disjoint_and_deterministic():
  n = 1000
  seeds = {s: {fundus_phantom.split_seed(s, i) for i in range(n)} for s in fundus_phantom.SPLITS}
  assert all(len(v) == n for v in seeds.values())
  assert not seeds["train"] & seeds["validation"] and not seeds["validation"] & seeds["test"]
  assert fundus_phantom.split_seed("test", 5) == fundus_phantom.split_seed("test", 5)
  with pytest.raises(ValueError):
    fundus_phantom.split_seed("train", fundus_phantom.MAX_SPLIT_SIZE)


def test_config_names_round_trip():
  custom = fundus_phantom.make_config(64, 32, 8, 4, True)
  assert custom.name == "r64_t32_v8_e4_masks"
  back = fundus_phantom.config_from_name(custom.name)
  assert (back.resolution, back.num_train, back.num_val, back.num_test, back.with_masks) == (
      64, 32, 8, 4, True)
  standard = fundus_phantom.config_from_name("r128_n2k")
  assert (standard.resolution, standard.num_train, standard.with_masks) == (128, 2048, False)
  same_sizes = fundus_phantom.phantom_builder(64, 256, 32, 32, False, data_dir="/nonexistent")
  assert same_sizes.builder_config.name == "r64_n256"
  with pytest.raises(ValueError, match="r64_n256"):
    fundus_phantom.config_from_name("tiny")


def test_decode_example_and_unknown_codes():
  labels = labels_lib.FundusLabels(quality="usable")
  ex = features.make_example("x1", b"unused", labels, synthetic=False)
  assert [int(ex[k]) for k in features.SCALAR_NAMES] == [-1, 1, -1]
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  stored = dict(ex, image=image, id=b"x1", labels=ex["labels"].encode(),
                caption=ex["caption"].encode())
  out = features.decode_example(stored)
  np.testing.assert_array_equal(out["image"], image)
  assert out["labels"] == labels and out["id"] == "x1" and out["synthetic"] is False
  assert out["caption"] == captions.caption(labels, 0)
  assert "masks" not in out and "record" not in out
