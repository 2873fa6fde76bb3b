"""Trains the text-conditioned latent diffusion UNet on fundus images and their captions.

  fundax train ldm --config configs/ldm.py --workdir runs/ldm \
      --config.vae_checkpoint=runs/vae/checkpoints                 # phantom, 128 px
  fundax train ldm --config configs/ldm.py:tiny --workdir runs/t   # 32 px, a few CPU steps
  fundax train ldm --config configs/ldm.py:base --workdir runs/b \
      --config.vae_checkpoint=runs/vae_base                        # 256 px, GPU/TPU
  fundax sample --checkpoint runs/ldm/checkpoints --prompt "..."   # afterwards

The VAE is frozen: it comes from a `configs/vae.py` run or a `fundax convert vae` directory
(`vae_checkpoint`), or, when that is empty, is freshly initialised from `vae.*` (tests and
smoke runs only: its latents mean nothing). The text encoder is frozen too (all-MiniLM-L6-v2
by default, hidden 384, so the UNet's cross-attention width is 384). `unet_init` starts the
UNet from a `fundax convert unet` directory (params only; see configs/sd15_fundus.py). Expect
`<workdir>/metrics.jsonl`, `<workdir>/tensorboard/`, `<workdir>/samples/step_<N>.png`
(SYNTHETIC-stamped grids with their prompts, sampled with the EMA params) and
`<workdir>/checkpoints/<step>/`, which alone is enough to sample. Interrupt (or SIGTERM) and
rerun the same command to resume.

Variants: default (phantom, 128 px, CPU-sized model), tiny (32 px, tests), base (256 px,
phantom_256, a GPU/TPU-sized UNet over a 4-level VAE).
"""

import ml_collections

from fundax.data.config import data_config

VARIANTS = ("default", "tiny", "base")


def get_config(arg=None):
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"configs/ldm.py variants: {', '.join(VARIANTS)}; got {variant!r}")
  tiny, base = variant == "tiny", variant == "base"

  def pick(default, tiny_value, base_value):
    return tiny_value if tiny else base_value if base else default

  c = ml_collections.ConfigDict()
  # PRNG of the root key: threefry2x32, rbg or unsafe_rbg (much faster to compile on CPU).
  c.prng_impl = "unsafe_rbg" if tiny else "threefry2x32"
  c.seed = 0  # root seed: init, step randomness, data order, sample noise
  c.data = data_config(pick("phantom", "phantom_tiny", "phantom_256"))
  c.resolution = pick(128, 32, 256)  # training image side, px
  c.flip = True  # random laterality-aware horizontal flips
  # "right": every eye is shown in the right eye's orientation (left eyes mirrored, captions
  # unchanged) and left-eye samples are mirrored after decoding, so the disc is on the eye's
  # side by construction; "" learns the side from the caption (README, "The generator").
  c.canonical_eye = ""
  c.crop_fov = False  # crop photographs to the field of view (phantom images are centred)
  c.random_caption_style = True  # captions in a random style per example
  c.max_length = pick(160, 8, 160)  # token sequence length L: no phantom caption is cut
  # Mesh axis sizes; -1 = remaining devices. The batch is split over data x fsdp.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1} if base else {"data": -1})
  c.sharding_rules = ((".*", "fsdp"),)  # (regex over param paths, spec); see fundax.parallel
  c.num_steps = pick(50000, 4, 100000)  # optimizer steps of the run (the LR schedule's length)
  c.stop_at_step = 0  # stop after this step (0 = num_steps), e.g. to split a run in parts
  c.batch_size = pick(64, 8, 256)  # global batch size, images
  c.resume_path = ""  # another run's checkpoint to start from when the workdir has none
  c.unet_init = ""  # `fundax convert unet` directory: initial UNet params (params only)
  c.max_nonfinite_steps = 10  # stop after this many consecutive NaN/inf-loss (skipped) steps

  # Encode every training image and caption phrasing once with the frozen VAE and text
  # encoder (fundax.train.frozen_cache) instead of in every step; rebuilt when the data, the
  # networks or these settings change.
  c.cache = ml_collections.ConfigDict()
  c.cache.enabled = not tiny  # train on the cache (the tiny test config encodes per step)
  c.cache.dir = ""  # where caches live ("" = <workdir>/cache), one subdirectory per key
  c.text_encoder = "minilm"  # text encoder spec: minilm, random, a local dir or a hub id
  # configs/vae.py run (workdir or checkpoints dir), `fundax convert vae` dir or the name of an
  # autoencoder fundax ships ("phantom-64": 64 px, f = 4, 8 latent channels); "" = fresh VAE.
  c.vae_checkpoint = ""
  c.vae = ml_collections.ConfigDict()  # the fresh VAE's architecture (vae_checkpoint = "")
  c.vae.block_out_channels = pick((64, 128, 256), (16, 32), (128, 256, 512, 512))  # per level
  c.vae.layers_per_block = 1  # resnets per encoder level (decoder: one more)
  c.vae.latent_channels = 4  # channels of the latent
  c.vae.norm_num_groups = 8 if tiny else 32  # GroupNorm groups
  c.vae.scaling_factor = 0.18215  # latent scale seen by the UNet

  c.unet = ml_collections.ConfigDict()
  c.unet.block_out_channels = pick((128, 256, 256), (32, 64), (192, 384, 768))  # per level
  c.unet.cross_attention = pick((True, True, False), (True, False), (True, True, True))
  c.unet.layers_per_block = 1 if tiny else 2  # resnets per down level
  c.unet.attention_head_dim = 2 if tiny else 8  # heads per attention (diffusers' naming)
  c.unet.norm_num_groups = 8 if tiny else 32  # GroupNorm groups
  c.unet.prediction_type = "epsilon"  # what the UNet predicts: epsilon or v_prediction
  # conv_in also reads x/y coordinate channels, so the text can place the optic disc
  # (fundax only: such a UNet has no diffusers export)
  c.unet.coordinate_input = False
  c.unet.text_mask = True  # cross-attention ignores padding tokens
  c.unet.remat = base  # rematerialise blocks in the backward pass (saves memory)
  # How the UNet computes (same parameters, same maths; fundax.models.lowering): attention
  # "flash" (cache-blocked, fastest on CPU) or "xla" (TPU/GPU); convolutions "native" or
  # "matmul" (row-tap products); dense/conv operands "" (compute dtype) or "bfloat16"
  # (float32 accumulation: CPUs with AMX / AVX512-BF16). bench/README.md has the measurements.
  c.unet.attention_impl = pick("flash", "flash", "xla")
  c.unet.conv_impl = "native"
  c.unet.matmul_dtype = ""
  c.unet.attention_chunk = 0  # "xla": queries per chunk (0: all); bounds score memory
  # Compute dtype of the UNet, VAE and text encoder (bfloat16 = mixed; params stay float32).
  c.dtype = "bfloat16" if base else "float32"

  c.scheduler = ml_collections.ConfigDict()
  c.scheduler.num_train_timesteps = 1000  # diffusion steps N
  c.scheduler.beta_schedule = "scaled_linear"  # linear, scaled_linear or squaredcos_cap_v2
  c.scheduler.beta_start = 0.00085  # first beta
  c.scheduler.beta_end = 0.012  # last beta
  c.scheduler.rescale_betas_zero_snr = False  # zero terminal SNR (use with v_prediction)
  # Sampler timesteps: "" (each sampler's diffusers default), "leading", "trailing" (starts at
  # t = N - 1: what zero terminal SNR needs) or "linspace".
  c.scheduler.timestep_spacing = ""

  c.train = ml_collections.ConfigDict()
  c.train.caption_dropout = 0.1  # probability of training on the empty prompt (for CFG)
  c.train.snr_gamma = 5.0  # min-SNR-gamma loss weighting; 0 disables
  c.train.ema_decay = 0.9999 if not tiny else 0.9  # EMA of the UNet params per step; 0 = off

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3 if tiny else 1e-4  # peak learning rate
  c.optim.warmup_steps = pick(1000, 1, 2000)  # linear warmup steps
  c.optim.end_lr_factor = 0.1  # final LR as a fraction of the peak (cosine decay)
  c.optim.weight_decay = 0.01  # AdamW decay per unit LR on kernels
  c.optim.grad_clip_norm = 1.0  # global gradient-norm clip; 0 disables

  c.sample = ml_collections.ConfigDict()
  c.sample.every = pick(2500, 4, 5000)  # steps between sample grids; 0 disables
  c.sample.num_images = 4 if tiny else 8  # images per grid (prompts: validation captions)
  c.sample.sampler = "ddim"  # ddim, ddpm or dpm_solver
  c.sample.num_steps = 3 if tiny else 50  # reverse-diffusion steps
  c.sample.guidance_scale = 4.0  # classifier-free guidance weight
  c.sample.eta = 0.0  # DDIM stochasticity

  c.log_every = 1 if tiny else 50  # steps between train-metric records
  c.eval_every = pick(2500, 4, 5000)  # steps between validation losses; 0 disables
  c.eval_batch_size = pick(64, 8, 256)  # global batch size of validation
  c.checkpoint_every = pick(2500, 2, 5000)  # steps between checkpoints
  c.max_to_keep = 3  # checkpoints kept
  return c
