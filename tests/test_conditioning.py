"""Conditioning sanity: a tiny LDM learns a layout that only the caption's eye decides.

A toy latent set where the brighter half of every latent is the side of the eye its caption
names (as an optic disc sits on the eye's side of a macula-centred photograph), with the real
pretrained text encoder and full phantom captions (the eye is one token among ~70), trained
with the generator's recipe: v-prediction on a zero-terminal-SNR schedule. With epsilon
prediction on the usual schedule the same UNet read the eye from the residual signal of the
noisy input instead (sampling starts from pure noise, so the side came out at random); see
README, "The generator".
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fundax.data import captions
from fundax.data import phantom
from fundax.data import tokenizer as tokenizer_lib
from fundax.diffusion import samplers
from fundax.models import ldm as ldm_lib
from fundax.models import text_encoder as text_lib
from fundax.models import unet as unet_lib
from fundax.models import vae as vae_lib
from fundax.train import ldm_step
from fundax.train import optim
from fundax.train import state as state_lib
import tiny_ldm

SIDE = 8  # latent side
LENGTH = 96  # tokens: every caption style names the eye within its first dozen tokens


def _captions(first_seed: int, num: int):
  """Phantom captions in random styles, half of them flipped: (texts, right-eye flags)."""
  rng = np.random.default_rng(first_seed)
  texts, right = [], []
  for i in range(num):
    labels = phantom.sample_case(np.random.default_rng(first_seed + i)).labels()
    if rng.random() < 0.5:
      labels = labels.flipped()
    texts.append(captions.caption(labels, int(rng.integers(captions.NUM_STYLES))))
    right.append(labels.laterality == "right")
  return texts, np.array(right)


def _latent(right: bool) -> np.ndarray:
  z = np.full((SIDE, SIDE, 4), -0.5, np.float32)
  half = slice(SIDE // 2, None) if right else slice(None, SIDE // 2)
  z[:, half, 0] = 1.0  # the eye's side is bright
  return z


def test_a_tiny_ldm_learns_the_eye_from_the_caption():
  text, text_params, _ = text_lib.load_text_encoder("minilm")
  tokenizer = tokenizer_lib.make_tokenizer()
  encode = jax.jit(lambda ids, mask: text.apply({"params": text_params}, ids, mask))

  # Training and held-out captions (other phantom cases) encoded in one call: one compile.
  train_texts, train_right = _captions(0, 96)
  test_texts, test_right = _captions(10_000, 32)
  tokens = tokenizer_lib.tokenize(tokenizer, train_texts + test_texts, LENGTH)
  all_states = np.asarray(encode(tokens["input_ids"], tokens["attention_mask"]))
  all_mask = np.asarray(tokens["attention_mask"])
  train_states, train_mask = all_states[:96], all_mask[:96]
  test_states, test_mask = all_states[96:], all_mask[96:]
  latents = np.stack([_latent(r) for r in train_right])
  unet = unet_lib.UNetConfig(
      sample_size=SIDE, block_out_channels=(32, 64),
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
      cross_attention_dim=text.output_dim, attention_head_dim=4, norm_num_groups=8,
      attention_impl="flash", prediction_type="v_prediction")
  vae = vae_lib.VAEConfig(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                          up_block_types=("UpDecoderBlock2D",), norm_num_groups=4)
  models = ldm_lib.Models(
      unet=unet_lib.UNet2DConditionModel(unet), vae=vae_lib.AutoencoderKL(vae), text=text,
      scheduler={"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                 "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"})
  empty = ldm_lib.empty_text(models, text_params, LENGTH)
  steps = 300
  tx = optim.make_optimizer({"lr": 1e-3, "total_steps": steps, "warmup_steps": 20,
                             "grad_clip_norm": 1.0})
  params = tiny_ldm.run_init(
      lambda key: models.unet.init(key, *unet_lib.dummy_inputs(unet))["params"], jax.random.key(0))
  state = state_lib.create(params, tx)
  config = ml_collections.ConfigDict({"caption_dropout": 0.1, "snr_gamma": 0.0,
                                      "ema_decay": 0.0})
  step = jax.jit(functools.partial(ldm_step.ldm_train_step, models=models, tx=tx,
                                   config=config))
  for k in range(steps):
    idx = np.random.default_rng([1, k]).choice(len(latents), 16)
    batch = {"latents": latents[idx], "text_embeddings": train_states[idx],
             "attention_mask": train_mask[idx]}
    state, _ = step(state, batch, jax.random.key(1), {"empty_text": empty})

  # The held-out captions sampled from pure noise with the trained sampler.
  uncond = (jnp.broadcast_to(empty[0], test_states.shape),
            jnp.broadcast_to(empty[1], test_mask.shape))
  x = samplers.sample_loop(
      functools.partial(ldm_lib.denoise, models, state.params), models.schedule,
      jax.random.normal(jax.random.key(5), (32, SIDE, SIDE, 4)), (test_states, test_mask),
      uncond, jax.random.key(6), sampler="ddim", num_steps=20, guidance_scale=1.0,
      prediction_type="v_prediction", **models.timestep_options)
  channel = np.asarray(x)[..., 0]
  drawn_right = channel[:, :, SIDE // 2:].mean((1, 2)) > channel[:, :, :SIDE // 2].mean((1, 2))
  assert (drawn_right == test_right).mean() >= 0.95
