"""Trains the KL autoencoder (VAE) whose latents the diffusion model works in.

  fundax train vae --config configs/vae.py --workdir runs/vae          # phantom, 128 px
  fundax train vae --config configs/vae.py:tiny --workdir runs/vae_t   # 32 px, a few CPU steps
  fundax train vae --config configs/vae.py:base --workdir runs/vae_b   # 256 px, GPU/TPU

Expect `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/` (rec, kl, ssim, PSNR on the
validation split), `<workdir>/samples/step_<N>.png` (validation images next to their
reconstructions) and `<workdir>/checkpoints/<step>/`, which `configs/ldm.py`'s `vae_checkpoint`
takes. Interrupt (or SIGTERM) and rerun the same command to resume.

Variants: default (phantom, 128 px, 4x downsampling), tiny (32 px, tests), base (256 px,
phantom_256, Stable Diffusion's 4-level 8x autoencoder, the VAE of configs/ldm.py:base).
"""

import ml_collections

from fundax.data.config import data_config

VARIANTS = ("default", "tiny", "base")


def get_config(arg=None):
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"configs/vae.py variants: {', '.join(VARIANTS)}; got {variant!r}")
  tiny, base = variant == "tiny", variant == "base"

  def pick(default, tiny_value, base_value):
    return tiny_value if tiny else base_value if base else default

  c = ml_collections.ConfigDict()
  # PRNG of the root key: threefry2x32, rbg or unsafe_rbg (much faster to compile on CPU).
  c.prng_impl = "unsafe_rbg" if tiny else "threefry2x32"
  c.seed = 0  # root seed: init, step randomness, data order
  c.data = data_config(pick("phantom", "phantom_tiny", "phantom_256"))
  c.resolution = pick(128, 32, 256)  # training image side, px
  c.flip = True  # random laterality-aware horizontal flips
  c.crop_fov = False  # crop photographs to the field of view (phantom images are centred)
  # Mesh axis sizes; -1 = remaining devices. The batch is split over data x fsdp.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1} if base else {"data": -1})
  c.sharding_rules = ((".*", "fsdp"),)  # (regex over param paths, spec); see fundax.parallel
  c.num_steps = pick(20000, 4, 50000)  # optimizer steps of the run (the LR schedule's length)
  c.stop_at_step = 0  # stop after this step (0 = num_steps), e.g. to split a run in parts
  c.batch_size = pick(32, 8, 64)  # global batch size, images
  c.resume_path = ""  # another run's checkpoint to start from when the workdir has none
  c.max_nonfinite_steps = 10  # stop after this many consecutive NaN/inf-loss (skipped) steps

  c.model = ml_collections.ConfigDict()
  c.model.block_out_channels = pick((64, 128, 256), (16, 32), (128, 256, 512, 512))  # per level
  c.model.layers_per_block = 2 if base else 1  # resnets per encoder level (decoder: one more)
  c.model.latent_channels = 4  # channels of the latent
  c.model.norm_num_groups = 8 if tiny else 32  # GroupNorm groups
  c.model.scaling_factor = 0.18215  # latent scale seen by the diffusion model
  c.model.dtype = "bfloat16" if base else "float32"  # compute dtype (params stay float32)

  c.disc = ml_collections.ConfigDict()
  c.disc.base_channels = 16 if tiny else 64  # first conv width of the PatchGAN
  c.disc.num_layers = 2 if tiny else 3  # stride-2 layers after the first conv

  c.train = ml_collections.ConfigDict()
  c.train.recon = "l1"  # reconstruction error: l1 or l2 (per pixel, images in [-1, 1])
  c.train.kl_weight = 1e-6  # weight of KL / image elements (LDM convention)
  c.train.ssim_weight = 0.1  # weight of (1 - SSIM); 0 disables
  c.train.adv_weight = 0.1 if tiny else 0.5  # weight of the generator hinge term; 0 = no GAN
  c.train.disc_start = 2 if tiny else 5000  # step at which the adversarial terms switch on
  c.train.ema_decay = 0.999  # EMA of the params per step; 0 disables

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3 if tiny else 1e-4  # peak learning rate
  c.optim.warmup_steps = 1 if tiny else 500  # linear warmup steps
  c.optim.end_lr_factor = 0.1  # final LR as a fraction of the peak (cosine decay)
  c.optim.b1 = 0.5  # Adam beta1 (GAN practice)
  c.optim.b2 = 0.9  # Adam beta2
  c.optim.weight_decay = 0.0  # AdamW decay per unit LR on kernels
  c.optim.grad_clip_norm = 1.0  # global gradient-norm clip; 0 disables

  c.log_every = 1 if tiny else 50  # steps between train-metric records
  c.eval_every = 4 if tiny else 1000  # steps between validation passes; 0 disables
  c.eval_batch_size = pick(32, 8, 64)  # global batch size of validation
  c.sample_every = 4 if tiny else 1000  # steps between reconstruction grids; 0 disables
  c.num_samples = 4 if tiny else 8  # validation images in a reconstruction grid
  c.checkpoint_every = 2 if tiny else 1000  # steps between checkpoints
  c.max_to_keep = 3  # checkpoints kept
  return c
