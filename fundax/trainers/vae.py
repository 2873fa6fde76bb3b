"""VAE training job: `run(config, workdir)` for configs/vae.py.

A short sequence of library calls: check the config (`validate_config`, before anything is
built), build the dataset, build the autoencoder (and, when the
adversarial term is on, the PatchGAN discriminator), create (or restore) the sharded train
state over the {"vae", "disc"} params, then `train_loop` with the pure `vae_train_step`,
periodic validation metrics (L1, PSNR, SSIM, KL) and reconstruction grids. Its checkpoints
are what configs/ldm.py's `vae_checkpoint` reads.
"""

from __future__ import annotations

import functools
import logging
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fundax import checkpoint
from fundax import parallel
from fundax.data import tokenizer as tokenizer_lib
from fundax.models import discriminator as disc_lib
from fundax.models import ldm as ldm_lib
from fundax.models import vae as vae_lib
from fundax.train import loop
from fundax.train import metric_writers
from fundax.train import optim
from fundax.train import state as state_lib
from fundax.train import vae_step

log = logging.getLogger(__name__)

BATCH_KEYS = ("image",)
# The pipeline tokenises captions whatever the job; the VAE ignores them.
MAX_LENGTH = 8


def build_models(config: ml_collections.ConfigDict):
  """(VAEConfig, AutoencoderKL, PatchDiscriminator or None) of a configs/vae.py config."""
  dtype = jnp.dtype(config.model.dtype)
  levels = len(config.model.block_out_channels)
  vae_config = vae_lib.VAEConfig(
      block_out_channels=tuple(config.model.block_out_channels),
      down_block_types=("DownEncoderBlock2D",) * levels,
      up_block_types=("UpDecoderBlock2D",) * levels,
      layers_per_block=config.model.layers_per_block,
      latent_channels=config.model.latent_channels,
      norm_num_groups=config.model.norm_num_groups, sample_size=config.resolution,
      scaling_factor=config.model.scaling_factor)
  discriminator = None
  if config.train.adv_weight > 0:
    discriminator = disc_lib.PatchDiscriminator(
        base_channels=config.disc.base_channels, num_layers=config.disc.num_layers,
        dtype=dtype)
  return vae_config, vae_lib.AutoencoderKL(vae_config, dtype=dtype), discriminator


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any dataset build or compile, on values that cannot work.

  Checks the fields every trainer shares (`loop.check_common`: batch sizes against the
  data-parallel devices of the mesh, step counts, mesh, PRNG) and the VAE's own: resolution
  against the downsampling factor, channels against GroupNorm groups, loss weights.

  Args:
    config: a configs/vae.py config.

  Raises:
    ValueError: listing every problem found, each naming its field and value.
  """
  problems = loop.check_common(config)
  m, t = config.model, config.train
  if m.dtype not in loop.DTYPES:
    problems.append(f"model.dtype must be one of {loop.DTYPES}, got {m.dtype!r}")
  factor = 2 ** (len(m.block_out_channels) - 1)
  if config.resolution % factor:
    problems.append(f"resolution {config.resolution} is not a multiple of the VAE's "
                    f"downsampling factor {factor} ({len(m.block_out_channels)} levels)")
  if any(c % m.norm_num_groups for c in m.block_out_channels):
    problems.append(f"model.block_out_channels {tuple(m.block_out_channels)} must all be "
                    f"multiples of model.norm_num_groups {m.norm_num_groups}")
  if t.recon not in ("l1", "l2"):
    problems.append(f"train.recon must be 'l1' or 'l2', got {t.recon!r}")
  for name in ("kl_weight", "ssim_weight", "adv_weight", "disc_start"):
    if t[name] < 0:
      problems.append(f"train.{name} must be >= 0, got {t[name]}")
  if not 0 <= t.ema_decay < 1:
    problems.append(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
  if config.sample_every < 0 or (config.sample_every and config.num_samples < 1):
    problems.append(f"sample_every must be >= 0 and num_samples >= 1, got "
                    f"{config.sample_every} and {config.num_samples}")
  loop.raise_if_invalid(problems, "VAE")


def _eval_params(state: state_lib.TrainState):
  """The params validation and grids read: the EMA when the state tracks it."""
  return state.ema_params if state.ema_params is not None else state.params


class _Measure:
  """Validation metrics and reconstruction grids of a VAE on a config's validation split."""

  def __init__(self, config, vae, data, tokenizer, mesh):
    self._config = config
    self._batches = functools.partial(
        loop.make_batches, config, data, "validation", tokenizer=tokenizer,
        max_length=MAX_LENGTH, mesh=mesh, train=False)
    self._eval_fn = jax.jit(functools.partial(vae_step.vae_eval_step, vae=vae))
    self._reconstruct = jax.jit(
        lambda params, x: jnp.clip(vae.apply({"params": params["vae"]}, x), -1.0, 1.0))

  def metrics(self, params) -> dict[str, float]:
    """Means over the validation split of L1, MSE, PSNR, SSIM and KL ({"vae": ...} params)."""
    return loop.evaluate(lambda b: self._eval_fn(params, b), self._batches(), BATCH_KEYS)

  def grid(self, path: pathlib.Path, params, *, title: str) -> None:
    """The first validation images beside their reconstructions, as a PNG at `path`."""
    num = self._config.num_samples
    batch = next(self._batches())
    originals = loop.to_host(batch["image"])[:num]
    recons = loop.to_host(self._reconstruct(params, batch["image"]))[:num]
    # Phantom "originals" are synthetic too; real photographs are not stamped.
    synthetic = loop.to_host(batch["synthetic"])[:num]
    images = [im for pair in zip(originals, recons) for im in pair]
    captions = [c for i in range(len(originals))
                for c in (f"original {i}", f"reconstruction {i}")]
    loop.save_grid(path, np.stack(images), captions,
                   synthetic=[flag for s in synthetic for flag in (bool(s), True)], title=title)


def evaluate(config: ml_collections.ConfigDict, vae_dir: str, workdir: str) -> dict[str, str]:
  """Measures a trained VAE on `config`'s validation split instead of training one.

  What a training run's validation hooks write, once, for the autoencoder at `vae_dir` (a
  `fundax train vae` run, a `fundax convert vae` directory, or the name of one fundax ships,
  `fundax.models.ldm.resolve_vae`): the "eval" record (L1, MSE, PSNR, SSIM, KL) in
  `<workdir>/metrics.jsonl` and the reconstruction grid `<workdir>/samples/reconstructions.png`.

  Args:
    config: a configs/vae.py config (its data, resolution, mesh and validation batch; its
      `model` and `train` sections are not used).
    workdir: output directory.

  Returns:
    As `run`, with "checkpoints" the resolved `vae_dir` (what the LDM loads).

  Raises:
    ValueError: the config's resolution is not a multiple of the VAE's downsampling.
  """
  path = ldm_lib.resolve_vae(vae_dir)
  vae_config, params = ldm_lib.load_vae(path)
  if config.resolution % vae_config.downsample_factor:
    raise ValueError(f"resolution {config.resolution} is not a multiple of the downsampling "
                     f"factor {vae_config.downsample_factor} of the VAE {path}")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  data = loop.prepare_data(config, workdir)
  measure = _Measure(config, vae_lib.AutoencoderKL(vae_config), data,
                     tokenizer_lib.make_tokenizer(), parallel.make_mesh(config.mesh))
  params = {"vae": params}
  writer = metric_writers.MetricWriter(workdir)
  try:
    writer.write(0, measure.metrics(params), split="eval")
  finally:
    writer.close()
  samples_dir = workdir / "samples"
  measure.grid(samples_dir / "reconstructions.png", params,
               title=f"fundax VAE {pathlib.Path(path).name}: validation images and "
               "reconstructions")
  return {"workdir": str(workdir), "metrics": str(writer.jsonl_path), "checkpoints": path,
          "samples": str(samples_dir)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """Trains (or resumes training) the autoencoder.

  Args:
    config: a configs/vae.py config.
    workdir: output directory; rerunning with the same one resumes from its last checkpoint.

  Returns:
    Output name -> path, for the CLI to print; with "unfinished" when SIGTERM or
    `stop_at_step` ended the run before `num_steps` (after saving a checkpoint to resume from).

  Raises:
    ValueError: an invalid config (before any compute).
    loop.NonFiniteLossError: `max_nonfinite_steps` NaN/inf steps in a row.
  """
  validate_config(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  data = loop.prepare_data(config, workdir)
  rng_init, rng_train = jax.random.split(jax.random.key(config.seed, impl=config.prng_impl))
  vae_config, vae, discriminator = build_models(config)
  tokenizer = tokenizer_lib.make_tokenizer()
  mesh = parallel.make_mesh(config.mesh)
  rules = [tuple(r) for r in config.sharding_rules]
  tx = optim.make_optimizer({**config.optim.to_dict(), "total_steps": config.num_steps})

  def make_state(rng):
    rng_vae, rng_disc = jax.random.split(rng)
    image = jnp.zeros((1, config.resolution, config.resolution, 3))
    params = {"vae": vae.init(rng_vae, image)["params"]}
    if discriminator is not None:
      params["disc"] = discriminator.init(rng_disc, image)["params"]
    return state_lib.create(params, tx, ema=config.train.ema_decay > 0)

  abstract = {"state": parallel.abstract_sharded(make_state, rng_init, mesh, rules)}
  state_shardings = jax.tree.map(lambda x: x.sharding, abstract["state"])
  manager = checkpoint.make_manager(workdir, max_to_keep=config.max_to_keep)
  restored, extras, source = checkpoint.restore_or_init(
      manager, abstract,
      lambda: {"state": parallel.init_sharded(make_state, rng_init, mesh, rules)},
      resume_path=config.resume_path or None)
  state = restored["state"]
  log.info("VAE state from %s at step %d", source, int(state.step))

  batches = loop.make_batches(config, data, "train", tokenizer=tokenizer,
                              max_length=MAX_LENGTH, mesh=mesh, train=True)
  if extras.get("data"):
    batches.set_state(extras["data"])
  step_fn = parallel.jit_step(
      functools.partial(vae_step.vae_train_step, vae=vae, discriminator=discriminator, tx=tx,
                        config=config.train),
      state_shardings, parallel.batch_sharding(mesh))
  checkpoint_config = {"job": config.to_dict(), "models": {"vae": vae_config.to_diffusers()}}

  def save(step, state):
    checkpoint.save(manager, step, {"state": state}, config=checkpoint_config,
                    extras={"data": batches.get_state()})

  writer = metric_writers.MetricWriter(workdir, resume_step=int(state.step))
  measure = _Measure(config, vae, data, tokenizer, mesh)
  samples_dir = workdir / "samples"

  def eval_hook(step, state):
    writer.write(step, measure.metrics(_eval_params(state)), split="eval")

  def sample_hook(step, state):
    measure.grid(samples_dir / f"step_{step:07d}.png", _eval_params(state),
                 title=f"fundax VAE, step {step}: validation images and reconstructions")

  try:
    result = loop.train_loop(
        state, step_fn=step_fn, batches=batches, batch_keys=BATCH_KEYS, rng=rng_train,
        num_steps=config.stop_at_step or config.num_steps, writer=writer,
        log_every=config.log_every, checkpoint_every=config.checkpoint_every, save=save,
        hooks=[loop.Hook(config.eval_every, eval_hook),
               loop.Hook(config.sample_every, sample_hook)],
        max_nonfinite=config.max_nonfinite_steps)
  finally:
    checkpoint.wait(manager)
    manager.close()
    writer.close()
  return loop.outputs(workdir, writer, result, samples_dir, config.num_steps)
