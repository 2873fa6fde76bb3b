"""Tests for the Flax AutoencoderKL and its diffusers import/export.

Parity is against diffusers' PyTorch AutoencoderKL with the same (randomised) weights.
"""

import copy
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from fundax.interop import diffusers as dfx  # pylint: disable=g-import-not-at-top
from fundax.interop import params_io  # pylint: disable=g-import-not-at-top
from fundax.models import vae  # pylint: disable=g-import-not-at-top

TOL = 1e-4
TINY = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
            sample_size=16)


def rel_err(a, b):
  """max|a - b| / max|b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny diffusers AutoencoderKL with every weight randomised, saved and imported."""
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(**TINY).eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():  # default init has unit norm scales and zero biases: hide nothing.
    for name, p in model.named_parameters():
      base = 1.0 if p.ndim == 1 and name.endswith("weight") else 0.0
      p.copy_(base + 0.05 * torch.randn(p.shape, generator=gen))
  directory = str(tmp_path_factory.mktemp("vae"))
  model.save_pretrained(directory)
  config, params = dfx.import_vae(directory)
  return model, directory, config, params


@functools.lru_cache(maxsize=None)
def jitted(config, method, dtype=jnp.float32):
  model = vae.AutoencoderKL(config, dtype=dtype)
  return jax.jit(lambda params, x: model.apply({"params": params}, x, method=method))


def images(seed, batch=2, side=16):
  x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))
  return x, jnp.asarray(nhwc(x))


def test_encoder_decoder_parity(tiny):
  model, _, config, params = tiny
  x, jx = images(0)
  with torch.no_grad():
    posterior = model.encode(x).latent_dist
    decoded = model.decode(posterior.mean).sample
  ours = jitted(config, "encode")(params, jx)
  errs = {
      "mean": rel_err(ours.mean, nhwc(posterior.mean)),
      "logvar": rel_err(ours.logvar, nhwc(posterior.logvar)),
      "decode": rel_err(jitted(config, "decode")(params, jnp.asarray(nhwc(posterior.mean))),
                        nhwc(decoded)),
  }
  print("VAE parity rel errs:", {k: f"{v:.2e}" for k, v in errs.items()})
  assert ours.mean.shape == (2, 8, 8, 4)
  assert max(errs.values()) <= TOL, errs


def test_old_attention_key_names_import_identically(tiny, tmp_path):
  _, directory, _, params = tiny
  shutil.copy(os.path.join(directory, "config.json"), tmp_path / "config.json")
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  old = {}
  for key, value in load_file(os.path.join(directory, dfx.WEIGHTS_NAME)).items():
    for new, legacy in renames.items():
      key = key.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
    old[key] = value
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
  save_file(old, str(tmp_path / dfx.WEIGHTS_NAME))
  _, params_old = dfx.import_vae(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params_old, params)


def test_fp16_variant_imports(tiny, tmp_path):
  model, _, _, params = tiny
  copy.deepcopy(model).half().save_pretrained(tmp_path, variant="fp16")
  assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
  _, params16 = dfx.import_vae(tmp_path, variant="fp16")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
               params16, params)
  assert params16["decoder"]["conv_out"]["kernel"].dtype == np.float32


def test_export_loads_in_diffusers(tiny, tmp_path):
  _, _, config, params = tiny
  rng = np.random.default_rng(1)  # new weights, so the export is not a file copy
  params = jax.tree.map(lambda a: a + 0.02 * rng.standard_normal(a.shape).astype(a.dtype),
                        params)
  dfx.export_vae(tmp_path, config, params)
  model = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
  x, jx = images(1)
  with torch.no_grad():
    ref = model(x).sample
  err = rel_err(jitted(config, "__call__")(params, jx), nhwc(ref))
  print(f"VAE export round trip: rel err {err:.2e}")
  assert err <= TOL
  assert vae.VAEConfig.from_diffusers(json.loads((tmp_path / "config.json").read_text())) == config


def test_bf16_forward_is_finite(tiny):
  _, _, config, params = tiny
  _, jx = images(2)
  out = jitted(config, "__call__", jnp.bfloat16)(params, jx)
  assert out.dtype == jnp.bfloat16
  assert bool(jnp.isfinite(out.astype(jnp.float32)).all())


def test_posterior_and_latent_scaling():
  mean = jnp.full((1, 2, 2, 4), 0.5)
  posterior = vae.DiagonalGaussian(mean, jnp.zeros_like(mean))
  np.testing.assert_allclose(posterior.kl(), [0.5 * 16 * 0.25], rtol=1e-6)
  draws = posterior.sample(jax.random.key(0))
  assert draws.shape == mean.shape and not np.allclose(draws, mean)
  config = vae.VAEConfig(**TINY)
  np.testing.assert_allclose(vae.from_latents(vae.to_latents(mean, config), config), mean,
                             rtol=1e-6)
  np.testing.assert_allclose(vae.to_latents(mean, config), 0.5 * 0.18215, rtol=1e-6)


def test_full_size_layout_matches_diffusers():
  """Every tensor of the real SD VAE maps onto a fundax parameter of that shape."""
  config = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
  with torch.device("meta"):  # shapes only
    state_dict = diffusers.AutoencoderKL(**config).state_dict()
  shapes = {}
  for key, tensor in state_dict.items():
    path, perm = dfx.flax_key(key, tensor.ndim)
    shape = tuple(tensor.shape[i] for i in perm) if perm else tuple(tensor.shape)
    shapes[path] = jax.ShapeDtypeStruct(shape, jnp.float32)
  params_io.check_params_match(vae.abstract_params(vae.VAEConfig(**config)),
                               params_io.unflatten_params(shapes))


def test_mismatch_and_missing_files_are_named(tiny, tmp_path):
  _, directory, _, _ = tiny
  wrong = vae.VAEConfig(**{**TINY, "block_out_channels": (32, 48)})
  with pytest.raises(ValueError, match=r"shape mismatch for parameter 'decoder/conv_in/"):
    dfx.import_vae(directory, config=wrong)
  shutil.copy(os.path.join(directory, "config.json"), tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match=dfx.WEIGHTS_NAME):
    dfx.import_vae(tmp_path)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    dfx.import_vae(empty)
