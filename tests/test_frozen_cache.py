"""The frozen-network cache of LDM training: what it holds, when it is rebuilt, how it resumes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundax.data import captions
from fundax.data import datasets
from fundax.data import pipeline
from fundax.data import tokenizer as tokenizer_lib
from fundax.data.builders import features
from fundax.data.config import data_config
from fundax.models import bert
from fundax.models import ldm as ldm_lib
from fundax.models import text_encoder as text_lib
from fundax.models import unet as unet_lib
from fundax.models import vae as vae_lib
from fundax.train import frozen_cache
import tiny_ldm

LENGTH = 96  # tokens: the longest caption of these phantoms fits


def _data(data_dir, num_train=4):
  data = data_config("phantom_tiny")
  data.data_dir, data.num_train, data.num_validation, data.num_test = str(data_dir), num_train, 2, 2
  datasets.build_from_config(data)
  return data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A 4-image phantom split, a tiny VAE (32 px) and a tiny BERT on the real vocabulary."""
  data = _data(tmp_path_factory.mktemp("data"))
  vae_config = vae_lib.VAEConfig(
      block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=32)
  text = text_lib.TextEncoder(bert.BertConfig(vocab_size=30522, hidden_size=16,
                                              num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=32))
  unet_config = unet_lib.UNetConfig(
      sample_size=16, block_out_channels=(16,), down_block_types=("DownBlock2D",),
      up_block_types=("UpBlock2D",), layers_per_block=1, cross_attention_dim=16,
      attention_head_dim=2, norm_num_groups=8, mid_block_type=None)
  models = ldm_lib.Models(unet=unet_lib.UNet2DConditionModel(unet_config),
                          vae=vae_lib.AutoencoderKL(vae_config), text=text,
                          scheduler={"beta_schedule": "scaled_linear"})
  def init(key):
    key_vae, key_text = jax.random.split(key)
    return {"vae": models.vae.init(key_vae, jnp.zeros((1, 32, 32, 3)))["params"],
            "text": text.init(key_text, jnp.zeros((1, 4), jnp.int32))["params"]}
  frozen = tiny_ldm.run_init(init, jax.random.key(0))
  spec = frozen_cache.CacheSpec(
      data=frozen_cache.fingerprint_files(datasets.split_files(data, "train")),
      vae=frozen_cache.fingerprint_arrays(frozen["vae"]),
      text=frozen_cache.fingerprint_arrays(frozen["text"]), resolution=32, crop_fov=False,
      flip=True, random_caption_style=True, max_length=LENGTH)
  tokenizer = tokenizer_lib.make_tokenizer()
  root = tmp_path_factory.mktemp("cache")
  cache = frozen_cache.load_or_build(root, spec, datasets.load_from_config(data, "train"),
                                     models, frozen, tokenizer)
  return data, models, frozen, spec, tokenizer, root, cache


def test_cache_holds_what_each_step_would_encode(setup):
  data, models, frozen, spec, tokenizer, _, cache = setup
  source = datasets.load_from_config(data, "train")
  assert cache.latent_mean.shape == (4, 2, 16, 16, 4)  # 4 images x (as drawn, mirrored)
  assert cache.caption_rows.shape == (4, 2, captions.NUM_STYLES)
  noise = np.zeros((1, 16, 16, 4), np.float32)
  for row, flip, style in ((0, 0, 0), (2, 1, 3), (3, 1, 1)):
    example = features.decode_example(source[row])
    image = pipeline.to_float(pipeline.resize(example["image"], 32))
    labels = example["labels"]
    if flip:
      image, labels = image[:, ::-1], labels.flipped()
    batch = frozen_cache.assemble(cache, np.array([row]), np.array([flip]), np.array([style]),
                                  noise, models.vae.config)
    posterior = models.vae.apply({"params": frozen["vae"]}, image[None], method="encode")
    np.testing.assert_allclose(batch["latents"],
                               vae_lib.to_latents(posterior.mean, models.vae.config), atol=1e-5)
    tokens = tokenizer_lib.tokenize(tokenizer, [captions.caption(labels, style)], LENGTH)
    np.testing.assert_array_equal(batch["attention_mask"], tokens["attention_mask"])
    states = np.asarray(models.text.apply({"params": frozen["text"]}, tokens["input_ids"],
                                          tokens["attention_mask"]))
    real = tokens["attention_mask"][0].astype(bool)
    # float16 storage: the real tokens' states to ~1e-3; padding positions are zero.
    np.testing.assert_allclose(batch["text_embeddings"][0, real], states[0, real], rtol=2e-3,
                               atol=2e-3)
    assert not batch["text_embeddings"][0, ~real].any()
  # A posterior sample: mean + std * noise.
  ones = np.ones((1, 16, 16, 4), np.float32)
  sample = frozen_cache.assemble(cache, np.array([0]), np.array([0]), np.array([0]), ones,
                                 models.vae.config)["latents"]
  expected = (cache.latent_mean[0, 0] + cache.latent_std[0, 0]) * models.vae.config.scaling_factor
  np.testing.assert_allclose(sample[0], expected, rtol=1e-5)


def test_canonical_batches_show_every_eye_as_a_right_eye_with_its_own_caption(setup):
  data, models, _, _, _, _, cache = setup
  source = datasets.load_from_config(data, "train")
  eyes = [features.decode_example(source[i])["labels"].laterality for i in range(4)]
  assert list(cache.laterality) == [("right", "left").index(e) for e in eyes]
  assert set(eyes) == {"right", "left"}  # the test can fail
  batches = frozen_cache.CachedBatches(cache, global_batch_size=4, seed=0,
                                       vae_config=models.vae.config, canonical_eye="right")
  rng = np.random.default_rng([0, 0, 0, 1])  # step 0's draws, as CachedBatches makes them
  rng.integers(2, size=4)
  styles = rng.integers(captions.NUM_STYLES, size=4)
  noise = rng.standard_normal((4, 16, 16, 4)).astype(np.float32)
  batch = next(batches)
  rows = batches._rows(0)  # pylint: disable=protected-access
  left = np.array([eyes[r] == "left" for r in rows], int)
  expected = frozen_cache.assemble(cache, rows, left, styles, noise, models.vae.config,
                                   np.zeros(4, int))
  for key in ("latents", "text_embeddings", "attention_mask"):
    np.testing.assert_array_equal(batch[key], expected[key])


def test_cache_is_found_again_and_rebuilt_when_its_inputs_change(setup, tmp_path):
  data, models, frozen, spec, tokenizer, root, cache = setup
  assert frozen_cache.load(root / spec.key, spec) is not None
  for change in ({"data": "other"}, {"vae": "other"}, {"text": "other"}, {"max_length": 64},
                 {"flip": False}, {"random_caption_style": False}, {"resolution": 64}):
    other = dataclasses.replace(spec, **change)
    assert other.key != spec.key
    assert frozen_cache.load(root / spec.key, other) is None, change
  # A rebuilt dataset with other images has other files, so another fingerprint.
  rebuilt = _data(tmp_path, num_train=3)
  assert frozen_cache.fingerprint_files(datasets.split_files(rebuilt, "train")) != spec.data
  # New text-encoder weights change the fingerprint.
  perturbed = jax.tree.map(lambda x: x + 1e-3, frozen["text"])
  assert frozen_cache.fingerprint_arrays(perturbed) != spec.text
  # An interrupted build (no manifest) is never read: it is built again.
  (root / spec.key / frozen_cache.MANIFEST).unlink()
  assert frozen_cache.load(root / spec.key, spec) is None
  again = frozen_cache.load_or_build(root, spec, datasets.load_from_config(data, "train"),
                                     models, frozen, tokenizer)
  np.testing.assert_array_equal(again.latent_mean, cache.latent_mean)


def test_cached_batches_replay_after_a_restore_and_shard_by_process(setup):
  cache = setup[-1]
  config = setup[1].vae.config
  batches = frozen_cache.CachedBatches(cache, global_batch_size=2, seed=3, vae_config=config)
  first = [next(batches) for _ in range(5)]
  assert batches.get_state() == {"cached_step": 5}
  resumed = frozen_cache.CachedBatches(cache, global_batch_size=2, seed=3, vae_config=config)
  resumed.set_state({"cached_step": 3})
  again = next(resumed)
  for key in frozen_cache.BATCH_KEYS:
    np.testing.assert_array_equal(again[key], first[3][key])
  with pytest.raises(ValueError, match="not a cached-batch iterator state"):
    resumed.set_state({"epoch": 1})
  # Two processes read disjoint halves of the examples; an epoch visits each once.
  shards = [frozen_cache.CachedBatches(cache, global_batch_size=2, seed=3, vae_config=config,
                                       process_index=p, process_count=2) for p in range(2)]
  rows = [np.concatenate([s._rows(0), s._rows(1)]) for s in shards]  # one row a step each
  assert set(rows[0]) | set(rows[1]) == {0, 1, 2, 3} and not set(rows[0]) & set(rows[1])
  one = frozen_cache.CachedBatches(cache, global_batch_size=2, seed=3, vae_config=config)
  assert sorted(np.concatenate([one._rows(0), one._rows(1)]).tolist()) == [0, 1, 2, 3]
