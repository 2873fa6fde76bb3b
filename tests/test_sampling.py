"""Tests for the public sampling API (fundax.sampling) on a tiny random latent diffusion model."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundax import sampling
from fundax.models import ldm as ldm_lib
from tiny_ldm import LENGTH, STEPS, init_params, prompts, tiny_models

@pytest.fixture(scope="module")
def tiny():
  """(models, params, generate_fn, traces): generate_fn from make_generate_fn (DDIM); traces
  counts how often it traced `sampling.generate`."""
  models = tiny_models()
  traces = []
  original = sampling.generate

  def counting_generate(*args, **kwargs):
    traces.append(1)
    return original(*args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sampling, "generate", counting_generate)
    fn = sampling.make_generate_fn(models, sampler="ddim", num_steps=STEPS)
    yield models, init_params(models), fn, traces


def test_shape_range_and_determinism(tiny):
  models, params, fn, _ = tiny
  ids, mask = prompts()
  a = fn(params, ids, mask, jax.random.key(1), 3.0, 0.0)
  b = fn(params, ids, mask, jax.random.key(1), 3.0, 0.0)
  c = fn(params, ids, mask, jax.random.key(2), 3.0, 0.0)
  assert a.shape == (2, 32, 32, 3) and a.dtype == jnp.float32
  assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  assert models.latent_shape == (16, 16, 4)


def test_guidance_and_eta_do_not_retrace(tiny):
  _, params, fn, traces = tiny
  ids, mask = prompts()
  key = jax.random.key(0)
  out1 = fn(params, ids, mask, key, 1.0, 0.0)
  before = len(traces)
  out2 = fn(params, ids, mask, key, 5.0, 0.0)
  out3 = fn(params, ids, mask, key, 5.0, 1.0)
  assert len(traces) == before == 1
  assert not np.allclose(np.asarray(out1), np.asarray(out2))  # guidance is not ignored
  assert not np.allclose(np.asarray(out2), np.asarray(out3))  # neither is eta


def test_inside_user_jit_and_vmap_over_keys(tiny):
  models, params, fn, _ = tiny
  ids, mask = prompts()
  keys = jax.random.split(jax.random.key(3), 2)

  @jax.jit
  def user_fn(params, keys, guidance_scale):
    images = jax.vmap(lambda k: sampling.generate(
        params, models, ids, mask, k, sampler="ddim", num_steps=STEPS,
        guidance_scale=guidance_scale, eta=0.5))(keys)
    return images, images.mean(axis=(1, 2, 3, 4))  # the user's own computation on samples

  images, means = user_fn(params, keys, 2.0)
  assert images.shape == (2, 2, 32, 32, 3)
  np.testing.assert_allclose(np.asarray(means), np.asarray(images).mean(axis=(1, 2, 3, 4)),
                             atol=1e-5)
  single = fn(params, ids, mask, keys[1], 2.0, 0.5)
  np.testing.assert_allclose(np.asarray(images[1]), np.asarray(single), atol=2e-5)


def test_no_guidance_equals_guidance_one(tiny):
  """guidance_scale=None skips the unconditional pass; w=1 makes it cancel out."""
  models, params, fn, _ = tiny
  ids, mask = prompts()
  key = jax.random.key(4)
  unguided = jax.jit(lambda p: sampling.generate(p, models, ids, mask, key, sampler="ddim",
                                                  num_steps=STEPS, guidance_scale=None))
  np.testing.assert_allclose(np.asarray(unguided(params)),
                             np.asarray(fn(params, ids, mask, key, 1.0, 0.0)), atol=1e-4)


def test_models_config_round_trip(tiny):
  models = tiny[0]
  config = json.loads(json.dumps(ldm_lib.models_to_config(models)))
  rebuilt = ldm_lib.models_from_config(config, lowering={})  # XLA's own ops, as `models`
  assert ldm_lib.models_to_config(rebuilt) == config
  assert rebuilt.unet == models.unet and rebuilt.vae == models.vae
  assert rebuilt.text == models.text and rebuilt.text_mask == models.text_mask
  np.testing.assert_array_equal(np.asarray(rebuilt.schedule.alphas_cumprod),
                                np.asarray(models.schedule.alphas_cumprod))
  # The lowering is not part of the checkpoint: the loading backend picks it (the blocked
  # attention on CPU), or the caller does.
  assert jax.default_backend() == "cpu"
  assert ldm_lib.models_from_config(config).unet.config.attention_impl == "flash"
  chosen = ldm_lib.models_from_config(config, lowering={"conv_impl": "matmul"}).unet.config
  assert (chosen.conv_impl, chosen.attention_impl) == ("matmul", "xla")


def _sample_loop_kwargs(models, params, monkeypatch):
  """The keyword arguments `generate` passes to the sampling loop (traced only, no compute)."""
  seen = {}
  original = sampling.samplers.sample_loop

  def spy(*args, **kwargs):
    seen.update(kwargs)
    return original(*args, **kwargs)

  monkeypatch.setattr(sampling.samplers, "sample_loop", spy)
  ids, mask = prompts()
  jax.eval_shape(lambda p: sampling.generate(p, models, ids, mask, jax.random.key(0),
                                             sampler="ddim", num_steps=STEPS), params)
  return seen


def test_canonical_eye_mirrors_the_other_eyes_samples(tiny):
  models, params, fn, _ = tiny
  canonical = dataclasses.replace(models, canonical_eye="right")
  asks = ["Colour fundus photograph of the left eye.", "OD, macula-centred.", "OS.",
          "A fundus photograph."]
  np.testing.assert_array_equal(sampling.eye_mirror(canonical, asks),
                                [True, False, True, False])
  assert not sampling.eye_mirror(models, asks).any()
  ids, mask = prompts()
  key = jax.random.key(3)
  plain = np.asarray(fn(params, ids, mask, key, 2.0))
  mirror = np.array([True, False])
  mirrored = np.asarray(fn(params, ids, mask, key, 2.0, 0.0, mirror))
  np.testing.assert_array_equal(mirrored[0], plain[0][:, ::-1])
  np.testing.assert_array_equal(mirrored[1:], plain[1:])
  config = json.loads(json.dumps(ldm_lib.models_to_config(canonical)))
  assert ldm_lib.models_from_config(config).canonical_eye == "right"
  with pytest.raises(ValueError, match="canonical_eye"):
    dataclasses.replace(models, canonical_eye="left")


def test_scheduler_spacing_reaches_the_sampling_loop(tiny, monkeypatch):
  """A converted SD scheduler config (steps_offset 1, "leading") sets the sampled timesteps."""
  models, params, _, _ = tiny
  assert _sample_loop_kwargs(models, params, monkeypatch)["steps_offset"] == 0
  sd = ldm_lib.Models(unet=models.unet, vae=models.vae, text=models.text,
                      scheduler={**models.scheduler, "steps_offset": 1,
                                 "timestep_spacing": "trailing"})
  seen = _sample_loop_kwargs(sd, params, monkeypatch)
  assert (seen["steps_offset"], seen["timestep_spacing"]) == (1, "trailing")
  # ... and they change the timesteps the loop walks (diffusers' set_timesteps semantics).
  leading = sampling.samplers.make_timesteps("ddim", 10, steps_offset=1)[0]
  assert leading[0] == 901 and leading[-1] == 1


@pytest.fixture(scope="module")
def tokenizer():
  from fundax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return tokenizer_lib.make_tokenizer()


def test_empty_prompt_is_the_unconditional_input(tokenizer):
  from fundax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from fundax.models import text_encoder as text_lib  # pylint: disable=g-import-not-at-top
  tokens = sampling.tokenize(tokenizer, ["", "   ", None], 8)
  ids, mask = text_lib.empty_prompt_ids(8, text_lib.special_tokens(tokenizer_lib.minilm_dir()))
  for i in range(3):
    np.testing.assert_array_equal(tokens["input_ids"][i], np.asarray(ids[0]))
    np.testing.assert_array_equal(tokens["attention_mask"][i], np.asarray(mask[0]))


def test_long_prompt_truncated_with_warning(tokenizer, caplog):
  long = "left eye, severe non-proliferative diabetic retinopathy with haemorrhages"
  with caplog.at_level("WARNING", logger="fundax.sampling"):
    tokens = sampling.tokenize(tokenizer, ["right eye", long], 8)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and "prompt 1 has" in warnings[0] and "truncated" in warnings[0]
  assert tokens["input_ids"].shape == (2, 8)
  assert tokens["attention_mask"][1].sum() == 8  # full: cut to the length, [SEP] kept last
  assert tokens["input_ids"][1, -1] == tokenizer.sep_token_id
  assert tokens["attention_mask"][0].sum() < 8


def test_load_pipeline_from_a_relative_workdir(tiny, tmp_path, monkeypatch):
  """`fundax main --workdir runs/x` hands relative paths on; Orbax reads no metadata from them."""
  from fundax import checkpoint  # pylint: disable=g-import-not-at-top
  from fundax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  models, params, _, _ = tiny
  monkeypatch.chdir(tmp_path)
  manager = checkpoint.make_manager("run", max_to_keep=1)
  checkpoint.save(manager, 1, {"state": {"params": params["unet"]},
                               "frozen": {"vae": params["vae"], "text": params["text"]}},
                  config={"models": ldm_lib.models_to_config(models),
                          "tokenizer": tokenizer_lib.tokenizer_reference(),
                          "max_length": LENGTH}, extras={})
  checkpoint.wait(manager)
  manager.close()
  pipeline = sampling.load_pipeline("run")
  assert pipeline.max_length == LENGTH
  for a, b in zip(jax.tree.leaves(pipeline.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
