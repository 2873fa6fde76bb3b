"""A tiny random latent diffusion model shared by the sampling, LDM-step, evaluation and RLHF
tests, and its checkpoint written as the LDM trainer writes one."""

import jax
import jax.numpy as jnp
import numpy as np

from fundax import checkpoint
from fundax import parallel
from fundax.data import tokenizer as tokenizer_lib
from fundax.models import bert
from fundax.models import ldm as ldm_lib
from fundax.models import text_encoder as text_lib
from fundax.models import unet as unet_lib
from fundax.models import vae as vae_lib

LENGTH = 8
STEPS = 3


def tiny_models(text_mask=True):
  """One-level width-32 UNet on 16x16x4 latents, a 2-level VAE (32 px), a 1-layer BERT."""
  unet_config = unet_lib.UNetConfig(
      sample_size=16, block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
      up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, cross_attention_dim=32,
      attention_head_dim=2, norm_num_groups=8)
  vae_config = vae_lib.VAEConfig(
      block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=32)
  bert_config = bert.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64)
  return ldm_lib.Models(
      unet=unet_lib.UNet2DConditionModel(unet_config), vae=vae_lib.AutoencoderKL(vae_config),
      text=text_lib.TextEncoder(bert_config), scheduler={"beta_schedule": "scaled_linear",
                                                         "beta_start": 0.00085,
                                                         "beta_end": 0.012},
      text_mask=text_mask)


def run_init(init, key):
  """`init(key)` as one program compiled by `parallel.jit_once` (run op by op, an init compiles
  a program per op)."""
  return parallel.jit_once(init)(key)


def init_params(models, seed=0):
  """Random params for `tiny_models` (`run_init`)."""
  def init(key):
    k_unet, k_vae, k_text = jax.random.split(key, 3)
    x, t, ctx = unet_lib.dummy_inputs(models.unet.config)
    return {
        "unet": models.unet.init(k_unet, x, t, ctx)["params"],
        "vae": models.vae.init(k_vae, jnp.zeros((1, 32, 32, 3)))["params"],
        "text": models.text.init(k_text, jnp.zeros((1, LENGTH), jnp.int32))["params"],
    }
  return run_init(init, jax.random.key(seed))


def prompts(batch=2):
  ids = np.full((batch, LENGTH), 0, np.int32)
  ids[:, 0], ids[:, 1:4], ids[:, 4] = 101, np.arange(3 * batch).reshape(batch, 3) + 5, 102
  mask = (ids != 0).astype(np.int32)
  return jnp.asarray(ids), jnp.asarray(mask)


def save_checkpoint(workdir, models, params, *, tokenizer_dir=None, job=None) -> str:
  """`params` of `models` saved in the LDM trainer's self-describing checkpoint layout
  (fundax/trainers/ldm.py: UNet params and EMA, the frozen VAE and text encoder, the models'
  config and the tokenizer; `tokenizer_dir` None names the packaged MiniLM's). Returns the
  directory as a string, as the CLI and `sampling.load_pipeline` take it."""
  config = {"job": job or {}, "models": ldm_lib.models_to_config(models),
            "tokenizer": tokenizer_lib.tokenizer_reference(tokenizer_dir), "max_length": LENGTH}
  with checkpoint.make_manager(workdir, max_to_keep=1) as manager:
    checkpoint.save(manager, 1, {"state": {"params": params["unet"], "ema_params": params["unet"]},
                                 "frozen": {"vae": params["vae"], "text": params["text"]}},
                    config=config, extras={})
    checkpoint.wait(manager)
  return str(workdir)
