"""Tests for fundax.data.pipeline: preprocessing, flips, order, sharding, resume, config checks."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fundax import parallel
from fundax.data import captions
from fundax.data import pipeline
from fundax.data import tokenizer as tokenizer_lib
from fundax.data.labels import FundusLabels

RES = 16
MAX_LENGTH = 8


def fundus_image(h=40, w=56, cy=18, cx=32, r=15, seed=0):
  """A black frame with a bright, left-right asymmetric disc (an off-centre FOV)."""
  yy, xx = np.mgrid[:h, :w]
  inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
  noise = np.random.default_rng(seed).integers(0, 40, (h, w, 3))
  colour = np.stack([120 + 2 * (xx - cx), 80 + yy - cy, 60 + 0 * xx], -1) + noise
  return np.where(inside[..., None], np.clip(colour, 30, 255), 0).astype(np.uint8)


def record(i, laterality="right"):
  labels = FundusLabels(laterality=laterality, dr_grade=i % 5, quality="good")
  return {
      "image": fundus_image(seed=i),
      "id": f"ex{i}".encode(),
      "caption": f"stored caption {i}".encode(),
      "labels": labels.to_json().encode(),
      "synthetic": True,
      "dr_grade": i % 5,
      "quality": 0,
      "laterality": 0 if laterality == "right" else 1,
  }


@pytest.fixture(scope="module")
def source():
  return [record(i, ("right", "left")[i % 2]) for i in range(12)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "left", "right", "eye", "fundus", "of",
           "a", "the", "photograph", "retinopathy", "no", "diabetic", ","]
  vocab.write_text("\n".join(words) + "\n", encoding="utf-8")
  return tokenizer_lib.make_tokenizer(vocab)


def make(source, tokenizer, **kwargs):
  args = dict(global_batch_size=4, resolution=RES, max_length=MAX_LENGTH, tokenizer=tokenizer,
              seed=0, num_threads=1, prefetch=2)
  return pipeline.make_pipeline(source, **{**args, **kwargs})


def ids(batch):
  return [str(i) for i in batch["id"]]


# --- preprocessing ---------------------------------------------------------------------------

@pytest.mark.parametrize("h, w, cy, cx, r", [(60, 90, 25, 60, 20), (50, 80, 25, 40, 34)])
def test_fov_crop_centres_the_circle(h, w, cy, cx, r):
  # Second case: the circle is clipped at top and bottom, so the crop is padded with black.
  image = fundus_image(h, w, cy, cx, r)
  out = pipeline.crop_to_fov(image)
  side = out.shape[0]
  assert out.shape == (side, side, 3) and abs(side - (2 * r + 1)) <= 2
  yy, xx = np.nonzero(out.max(-1) > 0)
  centre = (side - 1) / 2
  assert abs(yy.mean() - centre) < 1.5 and abs(xx.mean() - centre) < 1.5
  assert xx.min() <= 1 and xx.max() >= side - 2  # the crop bounds the circle horizontally


def test_fov_crop_ignores_border_text():
  image = fundus_image(60, 90, 30, 45, 22)
  image[2:4, 2:8] = 255  # burnt-in annotations in the black border, above and beside the FOV
  image[28:32, 2:12] = 200
  out = pipeline.crop_to_fov(image)
  assert abs(out.shape[0] - 45) <= 2


def test_fov_crop_real_photograph():
  skimage_data = pytest.importorskip("skimage.data")
  retina = skimage_data.retina()  # 1411 x 1411, the FOV circle touches every side
  frame = np.zeros((1600, 2200, 3), np.uint8)
  frame[100:1511, 600:2011] = retina
  out = pipeline.crop_to_fov(frame)
  assert abs(out.shape[0] - 1411) <= 30  # the blur may widen the box by a few pixels
  offset = (out.shape[0] - 1411) // 2
  inner = out[offset:offset + 1411, offset:offset + 1411].astype(int)
  assert np.abs(inner - retina).mean() < 3  # aligned within a few pixels (0 px: 2.1, 5 px: 2.6)


def test_preprocess_shape_and_range(source):
  out = pipeline.preprocess_example(source[0], np.random.default_rng(0), resolution=RES)
  image = out["image"]
  assert image.shape == (RES, RES, 3) and image.dtype == np.float32
  assert image.min() >= -1.0 and image.max() <= 1.0
  assert image[0, 0].tolist() == [-1.0, -1.0, -1.0]  # black corner outside the FOV
  assert image.max() > 0.0


def _find_rng(source_record, flipped):
  for seed in range(100):
    rng = np.random.default_rng(seed)
    out = pipeline.preprocess_example(source_record, rng, resolution=RES)
    if bool(out["flipped"]) == flipped:
      return np.random.default_rng(seed)
  raise AssertionError("no seed found")


def test_flip_mirrors_pixels_labels_and_caption(source):
  rec = source[0]  # a right eye
  plain = pipeline.preprocess_example(rec, _find_rng(rec, False), resolution=RES)
  flipped = pipeline.preprocess_example(rec, _find_rng(rec, True), resolution=RES)
  np.testing.assert_array_equal(flipped["image"], plain["image"][:, ::-1])
  assert not np.array_equal(plain["image"], plain["image"][:, ::-1])  # the test can fail
  assert FundusLabels.from_json(plain["labels"]).laterality == "right" and plain["laterality"] == 0
  flipped_labels = FundusLabels.from_json(flipped["labels"])
  assert flipped_labels.laterality == "left" and flipped["laterality"] == 1
  assert flipped_labels.dr_grade == 0
  right_eye = [captions.caption(FundusLabels.from_json(rec["labels"]), s)
               for s in range(captions.NUM_STYLES)]
  left_eye = [captions.caption(flipped_labels, s) for s in range(captions.NUM_STYLES)]
  assert plain["caption"] in right_eye and plain["caption"] not in left_eye
  assert flipped["caption"] in left_eye and flipped["caption"] not in right_eye


def test_canonical_eye_mirrors_the_other_eye_and_keeps_its_caption(source):
  rec = source[0]  # a right eye
  as_left = dict(rec, labels=FundusLabels.from_json(rec["labels"]).flipped().to_json())
  for seed in range(4):  # no random flip: right eyes stay, left eyes are always mirrored
    right = pipeline.preprocess_example(rec, np.random.default_rng(seed), resolution=RES,
                                        canonical_eye="right")
    left = pipeline.preprocess_example(as_left, np.random.default_rng(seed), resolution=RES,
                                       canonical_eye="right")
    plain = pipeline.preprocess_example(rec, _find_rng(rec, False), resolution=RES)
    np.testing.assert_array_equal(right["image"], plain["image"])
    np.testing.assert_array_equal(left["image"], plain["image"][:, ::-1])
    assert not right["flipped"] and left["flipped"]
    labels = FundusLabels.from_json(left["labels"])
    assert labels.laterality == "left" and left["laterality"] == 1
    assert left["caption"] in [captions.caption(labels, s) for s in range(captions.NUM_STYLES)]
  # An eye of unknown side is still flipped at random.
  unknown = dict(rec, labels=dataclasses.replace(FundusLabels.from_json(rec["labels"]),
                                                 laterality=None).to_json())
  flips = {bool(pipeline.preprocess_example(unknown, np.random.default_rng(s), resolution=RES,
                                            canonical_eye="right")["flipped"])
           for s in range(16)}
  assert flips == {False, True}


def test_stored_caption_only_without_flips(source):
  rng = np.random.default_rng(0)
  out = pipeline.preprocess_example(source[3], rng, resolution=RES, flip=False,
                                    random_caption_style=False)
  assert out["caption"] == "stored caption 3" and not out["flipped"]
  assert (out["dr_grade"], out["quality"], out["laterality"]) == (3, 0, 1)
  # With flips on, the caption always comes from the (possibly flipped) labels.
  out = pipeline.preprocess_example(source[3], _find_rng(source[3], True), resolution=RES,
                                    random_caption_style=False)
  assert out["caption"] == captions.caption(FundusLabels.from_json(out["labels"]), 0)


# --- order, sharding and batches ---------------------------------------------------------------

def test_process_shard_disjoint_and_covering():
  for n, even in [(12, True), (13, False), (13, True)]:
    shards = [set(pipeline.process_shard(n, i, 2, even=even)) for i in range(2)]
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(n if not even else n - n % 2))
    assert abs(len(shards[0]) - len(shards[1])) <= (1 if not even else 0)


def test_two_processes_read_disjoint_records(source, tokenizer):
  seen = []
  for index in range(2):
    it = make(source, tokenizer, global_batch_size=4, process_index=index, process_count=2,
              num_epochs=1)
    seen.append([i for batch in it for i in ids(batch)])
  assert len(seen[0]) == len(seen[1]) == 6
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == {f"ex{i}" for i in range(12)}


def test_deterministic_by_seed_and_epochs_differ(source, tokenizer):
  def first(seed, n):
    it = make(source, tokenizer, seed=seed, global_batch_size=12)
    return [next(it) for _ in range(n)]

  a, b, c = first(0, 2), first(0, 2), first(1, 1)
  for x, y in zip(a, b):
    assert ids(x) == ids(y)
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
  assert ids(a[0]) != ids(c[0])
  # Each batch is one whole epoch here: same records, in a different order.
  assert sorted(ids(a[0])) == sorted(ids(a[1])) == sorted(f"ex{i}" for i in range(12))
  assert ids(a[0]) != ids(a[1])


def test_batches_are_global_and_tokenised(source, tokenizer):
  mesh = parallel.make_mesh({"data": -1, "fsdp": 2})
  batch = next(make(source, tokenizer, global_batch_size=8, mesh=mesh))
  for key in ("image", "input_ids", "attention_mask", "dr_grade", "laterality", "valid"):
    value = batch[key]
    assert isinstance(value, jax.Array), key
    assert value.shape[0] == 8 and len(value.addressable_shards) == 8
    assert value.sharding.spec == P(("data", "fsdp"))
  assert batch["image"].shape == (8, RES, RES, 3) and batch["image"].dtype == np.float32
  assert batch["input_ids"].shape == (8, MAX_LENGTH) and batch["input_ids"].dtype == np.int32
  assert isinstance(batch["caption"], np.ndarray) and len(batch["caption"]) == 8
  expected = tokenizer_lib.tokenize(tokenizer, list(batch["caption"]), MAX_LENGTH)
  np.testing.assert_array_equal(np.asarray(batch["input_ids"]), expected["input_ids"])
  np.testing.assert_array_equal(np.asarray(batch["attention_mask"]), expected["attention_mask"])


def test_state_round_trip(source, tokenizer):
  mesh = parallel.make_mesh({"data": -1})
  it = make(source, tokenizer, global_batch_size=8, mesh=mesh, seed=3)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # checkpoints store it as JSON
  expected = [next(it) for _ in range(2)]
  restored = make(source, tokenizer, global_batch_size=8, mesh=mesh, seed=3)
  restored.set_state(state)
  fresh_first = ids(next(make(source, tokenizer, global_batch_size=8, mesh=mesh, seed=3)))
  for want in expected:
    got = next(restored)
    assert ids(got) == ids(want)
    np.testing.assert_array_equal(np.asarray(got["image"]), np.asarray(want["image"]))
    np.testing.assert_array_equal(np.asarray(got["flipped"]), np.asarray(want["flipped"]))
  assert ids(expected[0]) != fresh_first  # restoring really moved the iterator


def test_eval_pads_to_whole_batches(source, tokenizer):
  batches = list(make(source[:5], tokenizer, global_batch_size=4, shuffle=False, num_epochs=1,
                      drop_remainder=False))
  assert len(batches) == 2
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.sum() == 5
  real = [i for b in batches for i, v in zip(ids(b), b["valid"]) if v]
  assert real == [f"ex{i}" for i in range(5)]


class _Unreadable:
  def __len__(self):
    return 12

  def __getitem__(self, index):
    raise AssertionError("read data before checking the config")


@pytest.mark.parametrize("kwargs, match", [
    (dict(global_batch_size=6, process_count=4, process_index=0), "process count 4"),
    (dict(global_batch_size=4, mesh="8"), "mesh's batch axes"),
    (dict(global_batch_size=0), "positive multiple"),
    (dict(global_batch_size=8, process_count=2, process_index=0, num_epochs=1,
          source=[None] * 6), "too few"),
])
def test_bad_config_fails_before_reading(tokenizer, kwargs, match):
  kwargs = dict(kwargs)
  if kwargs.get("mesh") == "8":
    kwargs["mesh"] = parallel.make_mesh({"data": -1})
  src = kwargs.pop("source", _Unreadable())
  with pytest.raises(ValueError, match=match):
    make(src, tokenizer, **kwargs)
