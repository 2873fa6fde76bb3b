"""Fine-tunes Stable Diffusion 1.5 into a text-to-fundus model at 512 px (GPU/TPU scale).

  fundax convert unet ~/sd15/unet runs/sd15_unet      # diffusers layout -> fundax params
  fundax convert vae ~/sd15/vae runs/sd15_vae
  fundax convert bert ~/BiomedBERT runs/biomedbert    # optional: a local text encoder
  fundax train ldm --config configs/sd15_fundus.py --workdir runs/sd15_fundus \
      --config.unet_init=runs/sd15_unet --config.vae_checkpoint=runs/sd15_vae \
      --config.text_encoder=runs/biomedbert
  fundax sample --checkpoint runs/sd15_fundus --prompt "left eye, moderate NPDR" --out g.png

The same fields as configs/ldm.py (`fundax.trainers.ldm.run` reads both). The UNet has Stable
Diffusion 1.5's architecture (block widths 320/640/1280/1280, cross-attention 768) and starts
from its converted weights, params only (`unet_init`; the optimizer and EMA start fresh); the
frozen VAE is SD 1.5's (`vae_checkpoint`, 8x downsampling, 64x64x4 latents). The text encoder
is BiomedBERT (hidden 768, so no projection): `text_encoder` names a local directory (a
Hugging Face BERT checkpoint or a `fundax convert bert` output) or, by default, the hub id
below, which is downloaded only because this config names it. Latents and text embeddings are
computed by the frozen networks inside the step (no separate cache pass). Compute runs in
bfloat16 (params and optimizer state stay float32), blocks are rematerialised, and params,
optimizer moments and EMA are fully sharded over the "fsdp" axis (the batch is split over
data x fsdp), so a v5e-16 or a single 80 GB GPU holds the run.

With `unet_init` or `vae_checkpoint` empty the run trains from scratch on a RANDOM VAE: smoke
tests and ahead-of-time compilation only. ARG: "" (phantom_512) or a real dataset name
(eyepacs, aptos2019, idrid, eyeq, odir5k, messidor2; pass --config.data.manual_dir).
"""

import ml_collections

from fundax.data.config import data_config

# BiomedBERT (uncased, PubMed abstracts + full text): the text encoder of fundax's design.
BIOMEDBERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext"


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.prng_impl = "threefry2x32"  # PRNG of the root key
  c.seed = 0  # root seed: init, step randomness, data order, sample noise
  c.data = data_config(arg or "phantom_512")
  c.resolution = 512  # training image side, px
  c.flip = True  # random laterality-aware horizontal flips
  c.canonical_eye = ""  # "right": every eye in one orientation, left samples mirrored (ldm.py)
  c.crop_fov = arg not in (None, "phantom_512")  # crop photographs to the field of view
  c.random_caption_style = True  # captions in a random style per example
  c.max_length = 77  # token sequence length L (Stable Diffusion's)
  # Fully sharded data parallel over every device: the batch is split over data x fsdp.
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1})
  # (regex over param paths, spec): large kernels (and their Adam moments and EMA copies,
  # which follow their parameter) are sharded on their largest divisible dimension; norms
  # and biases stay replicated (below fundax.parallel.FSDP_MIN_SIZE).
  c.sharding_rules = ((".*", "fsdp"),)
  c.num_steps = 20000  # optimizer steps of the run (the LR schedule's length)
  c.stop_at_step = 0  # stop after this step (0 = num_steps), e.g. to split a run in parts
  c.batch_size = 128  # global batch size, images
  c.resume_path = ""  # another run's checkpoint to start from when the workdir has none
  c.unet_init = ""  # `fundax convert unet` directory of SD 1.5's UNet (params only)
  c.max_nonfinite_steps = 10  # stop after this many consecutive NaN/inf-loss (skipped) steps

  c.text_encoder = BIOMEDBERT  # local dir (HF BERT or fundax params) or a hub id
  c.vae_checkpoint = ""  # `fundax convert vae` directory of SD 1.5's VAE
  c.vae = ml_collections.ConfigDict()  # SD 1.5's VAE architecture (used when it is fresh)
  c.vae.block_out_channels = (128, 256, 512, 512)  # channels per level
  c.vae.layers_per_block = 2  # resnets per encoder level (decoder: one more)
  c.vae.latent_channels = 4  # channels of the latent
  c.vae.norm_num_groups = 32  # GroupNorm groups
  c.vae.scaling_factor = 0.18215  # latent scale seen by the UNet

  c.unet = ml_collections.ConfigDict()  # SD 1.5's UNet; cross-attention width = BiomedBERT's
  c.unet.block_out_channels = (320, 640, 1280, 1280)  # channels per level
  c.unet.cross_attention = (True, True, True, False)  # per level
  c.unet.layers_per_block = 2  # resnets per down level
  c.unet.attention_head_dim = 8  # heads per attention (diffusers' naming)
  c.unet.norm_num_groups = 32  # GroupNorm groups
  c.unet.prediction_type = "epsilon"  # SD 1.5 predicts epsilon
  c.unet.coordinate_input = False  # SD 1.5's conv_in reads the 4 latent channels only
  c.unet.text_mask = True  # cross-attention ignores padding tokens
  c.unet.remat = True  # rematerialise blocks in the backward pass (saves memory)
  # Self-attention at 64x64 latents in chunks of 1024 queries: the 4096x4096 scores of 16
  # images would take 4 GiB per layer (fundax aot: 27 GiB of temporaries on v5e without it).
  c.unet.attention_chunk = 1024
  c.unet.attention_impl = "xla"  # XLA's attention (chunked above); "flash" is for CPUs
  c.unet.conv_impl = "native"  # XLA's convolutions
  c.unet.matmul_dtype = ""  # operands in the compute dtype (bfloat16 below)
  c.dtype = "bfloat16"  # compute dtype of the UNet, VAE and text encoder; float32 to disable

  c.scheduler = ml_collections.ConfigDict()  # SD 1.5's scheduler_config.json
  c.scheduler.num_train_timesteps = 1000  # diffusion steps N
  c.scheduler.beta_schedule = "scaled_linear"  # linear, scaled_linear or squaredcos_cap_v2
  c.scheduler.beta_start = 0.00085  # first beta
  c.scheduler.beta_end = 0.012  # last beta
  c.scheduler.rescale_betas_zero_snr = False  # zero terminal SNR (use with v_prediction)
  c.scheduler.steps_offset = 1  # added to "leading" sampling timesteps (SD 1.5's value)
  c.scheduler.timestep_spacing = "leading"  # sampling timestep spacing (SD 1.5's value)

  c.train = ml_collections.ConfigDict()
  c.train.caption_dropout = 0.1  # probability of training on the empty prompt (for CFG)
  c.train.snr_gamma = 5.0  # min-SNR-gamma loss weighting; 0 disables
  c.train.ema_decay = 0.9999  # EMA of the UNet params per step; 0 = off

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-5  # peak learning rate (fine-tuning)
  c.optim.warmup_steps = 500  # linear warmup steps
  c.optim.end_lr_factor = 0.1  # final LR as a fraction of the peak (cosine decay)
  c.optim.weight_decay = 0.01  # AdamW decay per unit LR on kernels
  c.optim.grad_clip_norm = 1.0  # global gradient-norm clip; 0 disables

  c.sample = ml_collections.ConfigDict()
  c.sample.every = 1000  # steps between sample grids; 0 disables
  c.sample.num_images = 8  # images per grid (prompts: validation captions)
  c.sample.sampler = "dpm_solver"  # ddim, ddpm or dpm_solver
  c.sample.num_steps = 25  # reverse-diffusion steps
  c.sample.guidance_scale = 7.5  # classifier-free guidance weight
  c.sample.eta = 0.0  # DDIM stochasticity

  c.log_every = 50  # steps between train-metric records
  c.eval_every = 1000  # steps between validation losses; 0 disables
  c.eval_batch_size = 128  # global batch size of validation
  c.checkpoint_every = 1000  # steps between checkpoints
  c.max_to_keep = 3  # checkpoints kept
  return c
