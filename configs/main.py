"""The main job: phantom data -> VAE -> LDM -> grids -> evaluator + Selector -> RLHF -> report.

  fundax main --config configs/main.py:tiny --workdir runs/tiny     # 64 px, ~18 min on 2 CPU cores
  fundax main --config configs/main.py --workdir runs/main          # 128 px (an accelerator)
  fundax main --config configs/main.py:test --workdir /tmp/t        # seconds per stage (tests)

Each stage's section is the config of its own job, so any field can be overridden:
`vae` (configs/vae.py), `ldm` (configs/ldm.py), `evaluator` (configs/evaluator.py),
`selector` (configs/selector.py) and `rlhf` (configs/rlhf.py; its ldm/selector/evaluator
checkpoints are the earlier stages' outputs), e.g. `--config.ldm.num_steps=2000` or
`--config.rlhf.num_rounds=4`. The VAE and the LDM train
on the one dataset `data` (their own `data` sections are dropped) at `resolution`.
Expect in the workdir: `data/`, `data_stats.json`, `preview.png`; `vae/` and `ldm/` (trainer
runs: checkpoints, metrics.jsonl, samples/; with `vae_checkpoint` set, `vae/` holds that VAE's
validation metrics and samples/reconstructions.png); `grids/dr<G>_<eye>.png`
(SYNTHETIC-stamped samples for DR grade G and each eye) and `grids/overview.png`;
`evaluator/`, `selector/`; `rlhf/` (the RLHF run: best/ is the kept model, report/ its curves
and before/after grids, feedback/ the simulated raters' database); `report/report.html` +
`report/metrics.json` (the kept model, with the RLHF section); `stages/<stage>.json` (one per
finished stage) and `summary.json` (per-stage wall and CPU times, key metrics). Rerun the
command to resume: finished stages are skipped, interrupted training continues from its last
checkpoint.
"""

import pathlib

import ml_collections

from fundax import configlib
from fundax.data.config import data_config

VARIANTS = ("default", "tiny", "test")
_CONFIGS = pathlib.Path(__file__).resolve().parent


def _job_config(name: str, arg: str | None) -> ml_collections.ConfigDict:
  """Another job's config file (configs/<name>.py), unlocked for the main job's overrides."""
  config = configlib.load_config(str(_CONFIGS / f"{name}.py") + (f":{arg}" if arg else ""))
  config.unlock()
  return config


def _trainer_config(name: str, arg: str | None, c: ml_collections.ConfigDict):
  """A VAE / LDM config that trains on the main job's dataset at its resolution."""
  config = _job_config(name, arg)
  del config["data"]  # the main job passes its own `data` section (one dataset for both)
  config.resolution = c.get_ref("resolution")
  return config


def get_config(arg=None):
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"configs/main.py variants: {', '.join(VARIANTS)}; got {variant!r}")
  small = variant in ("tiny", "test")
  test = variant == "test"
  sub = "tiny" if small else None  # variant of the stage configs
  c = ml_collections.ConfigDict()
  c.seed = 0  # seed of the preview and of the grid and report prompts
  c.stop_after = ""  # last stage to run ("" = all), e.g. "data" or "ldm"
  c.data = data_config("phantom_tiny" if small else "phantom")
  c.data.num_train = 12 if test else 512 if small else c.data.num_train
  c.data.num_test = 16 if test else 64 if small else c.data.num_test  # report prompts, TSTR
  c.resolution = 64 if small else 128  # side of the images every model sees, px

  c.preview = ml_collections.ConfigDict()
  c.preview.split = "train"  # split shown in the preview grid
  c.preview.num_images = 8 if small else 16  # tiles in the grid
  c.preview.columns = 4  # tiles per row
  c.preview.tile = 256  # tile size, px

  c.vae = _trainer_config("vae", sub, c)
  # A trained autoencoder the LDM trains on instead of one trained by the job (a `fundax train
  # vae` run, a `fundax convert vae` directory, or the name of one fundax ships); "" trains
  # the `vae` section in <workdir>/vae. The Quickstart's is "phantom-64": the `vae` section's
  # architecture trained by bench/autoencoder.py for 4,000 steps on 4,096 phantoms, which the
  # job's budget cannot give its own VAE (README, "The generator").
  c.vae_checkpoint = "phantom-64" if small and not test else ""
  c.ldm = _trainer_config("ldm", sub, c)
  # c.ldm.vae_checkpoint is set by the main job to the VAE stage's output.
  # The generator's recipe (README, "The generator"): the real pretrained text encoder, its
  # token states and the VAE latents encoded once (frozen cache), v-prediction on a
  # zero-terminal-SNR schedule with trailing sampler steps (sampling starts from pure noise,
  # so the layout must come from the text, not from signal left in x_T), no min-SNR weighting
  # (with v-prediction it would zero the high-noise steps where the layout is decided), and
  # coordinate channels; every eye in the right eye's orientation, left-eye samples mirrored
  # (the UNet did not learn the side from the caption: README, "The generator").
  u = c.ldm
  u.canonical_eye = "right"
  u.text_encoder = "random" if test else "minilm"
  u.cache.enabled = not test
  u.unet.prediction_type = "v_prediction"
  u.unet.coordinate_input = True
  u.scheduler.rescale_betas_zero_snr = True
  u.scheduler.timestep_spacing = "trailing"
  u.train.snr_gamma = 0.0
  if small:
    v = c.vae
    v.model.block_out_channels = (8, 8, 16) if test else (16, 32, 64)  # 64 px -> 16 x 16 latents
    v.model.latent_channels = 4 if test else 8  # 8: thin vessels survive the 4x downsampling
    v.num_steps = 2 if test else 600
    v.batch_size = 8
    v.train.adv_weight = 0.0  # no discriminator: the PatchGAN doubles the step's cost
    v.optim.lr = 3e-3
    v.optim.b2 = 0.99
    v.optim.warmup_steps = 1 if test else 10
    v.log_every = 1 if test else 10
    v.eval_every = v.sample_every = v.checkpoint_every = 2 if test else 150
    v.eval_batch_size = 8
    u.max_length = 8 if test else 160  # tokens: the longest phantom caption (146) is not cut
    u.num_steps = 2 if test else 2400  # the compute study (README, "The generator")
    u.batch_size = 8 if test else 16
    # test: one level (the tests check the job's wiring; fewer UNet programs' ops to compile)
    u.unet.block_out_channels = (32,) if test else (32, 64)
    u.unet.cross_attention = (True,) if test else (True, False)
    u.unet.attention_head_dim = 2 if test else 4
    u.train.ema_decay = 0.0 if test else 0.99
    u.optim.lr = 2e-3
    u.optim.warmup_steps = 1 if test else 20
    u.log_every = 1 if test else 20
    u.eval_every = u.checkpoint_every = 2 if test else 300
    u.eval_batch_size = 8
    u.sample.every = 0  # the main job draws its own grids

  c.grids = ml_collections.ConfigDict()
  c.grids.grades = (0, 1, 2, 3, 4)  # DR grades with a grid each (per eye)
  c.grids.tiles = 2 if test else 4  # prompts (one sample each) per grid
  c.grids.prompt_seed = 3_000_000_000  # first phantom case seed of the grid prompts
  c.grids.sampler = "ddim"  # ddim, ddpm or dpm_solver
  c.grids.num_steps = 2 if test else 25 if small else 50  # reverse-diffusion steps
  c.grids.guidance_scale = 3.0  # classifier-free guidance weight

  c.evaluator = _job_config("evaluator", sub)
  c.evaluator.data.resolution = c.get_ref("resolution")
  # Where evaluator runs are kept, one per config (trained once per resolution and recipe,
  # reused by every later main job); "" trains it inside the workdir.
  c.evaluator_cache = "" if test else "~/.cache/fundax/evaluators"
  c.selector = _job_config("selector", sub)
  c.selector.resolution = c.get_ref("resolution")
  if test:
    c.evaluator.data.num_train = c.evaluator.data.num_heldout = 16
    c.evaluator.batch_size = 8
    c.evaluator.optim.total_steps = 2
    c.evaluator.optim.warmup_steps = 1
    c.selector.graded.num_train = c.selector.graded.num_heldout = 16
    c.selector.ratings.num_synthetic = 16
    c.selector.batch_size = c.selector.eval_batch_size = 8
    c.selector.pairs_per_batch = 2
    c.selector.num_steps = c.selector.checkpoint_every = 2
    c.selector.optim.warmup_steps = 1

  c.rlhf = _job_config("rlhf", "test" if test else sub)
  c.rlhf.feedback.enabled = True  # simulated raters rate every round's candidates

  c.report = ml_collections.ConfigDict()
  c.report.num_prompts = 4 if test else 16 if small else 32  # test-split captions sampled from
  c.report.samples_per_prompt = 2 if test else 4  # images per prompt (diversity needs >= 2)
  c.report.batch_size = 8  # images per sampler call
  c.report.sampler_steps = c.grids.get_ref("num_steps")  # reverse-diffusion steps
  c.report.guidance_scale = c.grids.get_ref("guidance_scale")  # classifier-free guidance
  c.report.num_reference = 32 if test else 256 if small else 2048  # train images compared with
  c.report.kid_subsets = 10 if small else 50  # KID subset pairs
  c.report.utility_steps = 2 if test else 100 if small else 1000  # TSTR classifier steps
  c.report.c2st_steps = 2 if test else 150  # C2ST classifier steps (per fold)
  c.report.num_workers = 0 if test else 2  # processes rendering the prompt-matched phantoms
  return c
