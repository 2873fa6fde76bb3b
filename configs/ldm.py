"""Trains the text-conditioned latent diffusion UNet on fundus images and their captions.

  fundax train ldm --config configs/ldm.py --workdir runs/ldm \
      --config.vae_checkpoint=runs/vae/checkpoints                 # phantom, 128 px
  fundax train ldm --config configs/ldm.py:tiny --workdir runs/t   # 32 px, a few CPU steps
  fundax sample --checkpoint runs/ldm/checkpoints --prompt "..."   # afterwards

The VAE is frozen: it comes from a `configs/vae.py` run (`vae_checkpoint`), or, when that is
empty, is freshly initialised from `vae.*` (tests and smoke runs only: its latents mean
nothing). The text encoder is frozen too (all-MiniLM-L6-v2 by default, hidden 384, so the
UNet's cross-attention width is 384). Expect `<workdir>/metrics.jsonl`,
`<workdir>/tensorboard/`, `<workdir>/samples/step_<N>.png` (SYNTHETIC-stamped grids with their
prompts, sampled with the EMA params) and `<workdir>/checkpoints/<step>/`, which alone is
enough to sample. Interrupt and rerun the same command to resume.
"""

import ml_collections

from fundax.data.config import data_config


def get_config(arg=None):
  variant = arg or "default"
  if variant not in ("default", "tiny"):
    raise ValueError(f"configs/ldm.py variants: default, tiny; got {variant!r}")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  # PRNG of the root key: threefry2x32, rbg or unsafe_rbg (much faster to compile on CPU).
  c.prng_impl = "unsafe_rbg" if tiny else "threefry2x32"
  c.seed = 0  # root seed: init, step randomness, data order, sample noise
  c.data = data_config("phantom_tiny" if tiny else "phantom")
  c.resolution = 32 if tiny else 128  # training image side, px
  c.flip = True  # random laterality-aware horizontal flips
  c.crop_fov = False  # crop photographs to the field of view (phantom images are centred)
  c.random_caption_style = True  # captions in a random style per example
  c.max_length = 8 if tiny else 64  # token sequence length L
  c.mesh = ml_collections.ConfigDict({"data": -1})  # mesh axis sizes; -1 = remaining devices
  c.sharding_rules = ((".*", "fsdp"),)  # (regex over param paths, spec); see fundax.parallel
  c.num_steps = 4 if tiny else 50000  # optimizer steps of the run (the LR schedule's length)
  c.stop_at_step = 0  # stop after this step (0 = num_steps), e.g. to split a run in parts
  c.batch_size = 8 if tiny else 64  # global batch size, images
  c.resume_path = ""  # another run's checkpoint to start from when the workdir has none

  c.text_encoder = "minilm"  # text encoder spec: minilm, random, a local dir or a hub id
  c.vae_checkpoint = ""  # configs/vae.py run (workdir or checkpoints dir); "" = fresh VAE
  c.vae = ml_collections.ConfigDict()  # the fresh VAE's architecture (vae_checkpoint = "")
  c.vae.block_out_channels = (16, 32) if tiny else (64, 128, 256)  # channels per level
  c.vae.latent_channels = 4  # channels of the latent
  c.vae.norm_num_groups = 8 if tiny else 32  # GroupNorm groups
  c.vae.scaling_factor = 0.18215  # latent scale seen by the UNet

  c.unet = ml_collections.ConfigDict()
  c.unet.block_out_channels = (32, 64) if tiny else (128, 256, 256)  # channels per level
  c.unet.cross_attention = (True, False) if tiny else (True, True, False)  # per level
  c.unet.layers_per_block = 1 if tiny else 2  # resnets per down level
  c.unet.attention_head_dim = 2 if tiny else 8  # heads per attention (diffusers' naming)
  c.unet.norm_num_groups = 8 if tiny else 32  # GroupNorm groups
  c.unet.prediction_type = "epsilon"  # what the UNet predicts: epsilon or v_prediction
  c.unet.text_mask = True  # cross-attention ignores padding tokens
  c.unet.remat = False  # rematerialise blocks in the backward pass (saves memory)
  c.dtype = "float32"  # compute dtype of the UNet, VAE and text encoder (bfloat16 = mixed)

  c.scheduler = ml_collections.ConfigDict()
  c.scheduler.num_train_timesteps = 1000  # diffusion steps N
  c.scheduler.beta_schedule = "scaled_linear"  # linear, scaled_linear or squaredcos_cap_v2
  c.scheduler.beta_start = 0.00085  # first beta
  c.scheduler.beta_end = 0.012  # last beta
  c.scheduler.rescale_betas_zero_snr = False  # zero terminal SNR (use with v_prediction)

  c.train = ml_collections.ConfigDict()
  c.train.caption_dropout = 0.1  # probability of training on the empty prompt (for CFG)
  c.train.snr_gamma = 5.0  # min-SNR-gamma loss weighting; 0 disables
  c.train.ema_decay = 0.9999 if not tiny else 0.9  # EMA of the UNet params per step; 0 = off

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3 if tiny else 1e-4  # peak learning rate
  c.optim.warmup_steps = 1 if tiny else 1000  # linear warmup steps
  c.optim.end_lr_factor = 0.1  # final LR as a fraction of the peak (cosine decay)
  c.optim.weight_decay = 0.01  # AdamW decay per unit LR on kernels
  c.optim.grad_clip_norm = 1.0  # global gradient-norm clip; 0 disables

  c.sample = ml_collections.ConfigDict()
  c.sample.every = 4 if tiny else 2500  # steps between sample grids; 0 disables
  c.sample.num_images = 4 if tiny else 8  # images per grid (prompts: validation captions)
  c.sample.sampler = "ddim"  # ddim, ddpm or dpm_solver
  c.sample.num_steps = 3 if tiny else 50  # reverse-diffusion steps
  c.sample.guidance_scale = 4.0  # classifier-free guidance weight
  c.sample.eta = 0.0  # DDIM stochasticity

  c.log_every = 1 if tiny else 50  # steps between train-metric records
  c.eval_every = 4 if tiny else 2500  # steps between validation losses; 0 disables
  c.eval_batch_size = 8 if tiny else 64  # global batch size of validation
  c.checkpoint_every = 2 if tiny else 2500  # steps between checkpoints
  c.max_to_keep = 3  # checkpoints kept
  return c
