"""Latent diffusion training job: `run(config, workdir)` for configs/ldm.py and sd15_fundus.py.

A short sequence of library calls: check the config (`validate_config`, before anything is
built), build the dataset, build the models (`fundax.models.ldm.build_models`: the frozen
text encoder and VAE, from a configs/vae.py run or a `fundax convert vae` directory, and the
UNet), create (or restore) the sharded train state (resume order: the workdir, `resume_path`,
the `unet_init` params, scratch), then `train_loop` with the pure `ldm_train_step`, periodic
validation losses and SYNTHETIC-stamped sample grids drawn with the EMA params through the
public sampling API. Checkpoints hold the train state, the frozen
networks' params and the model configs, so a checkpoint directory alone is enough to sample
(`fundax.sampling.load_pipeline`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fundax import checkpoint
from fundax import parallel
from fundax import sampling
from fundax.data import datasets
from fundax.data import tokenizer as tokenizer_lib
from fundax.diffusion import registry
from fundax.diffusion import schedules
from fundax.interop import params_io
from fundax.models import ldm as ldm_lib
from fundax.models import unet as unet_lib
from fundax.train import frozen_cache
from fundax.train import ldm_step
from fundax.train import loop
from fundax.train import metric_writers
from fundax.train import optim
from fundax.train import state as state_lib

log = logging.getLogger(__name__)

BATCH_KEYS = ("image", "input_ids", "attention_mask")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any dataset build or compile, on values that cannot work.

  Checks the fields every trainer shares (`loop.check_common`: batch sizes against the
  data-parallel devices of the mesh, step counts, mesh, PRNG) and the LDM's own: sampler,
  resolution against the VAE's downsampling (read from `vae_checkpoint`'s JSON when given)
  and the UNet's, architecture consistency, probabilities and decays.

  Args:
    config: a configs/ldm.py (or sd15_fundus.py) config.

  Raises:
    ValueError: listing every problem found, each naming its field and value.
    FileNotFoundError: `vae_checkpoint` or `unet_init` does not exist.
  """
  problems = loop.check_common(config)
  if config.dtype not in loop.DTYPES:
    problems.append(f"dtype must be one of {loop.DTYPES}, got {config.dtype!r}")
  s = config.sample
  if s.sampler not in registry.sampler_names():
    problems.append(f"sample.sampler must be one of {registry.sampler_names()}, got "
                    f"{s.sampler!r}")
  if not 1 <= s.num_steps <= config.scheduler.num_train_timesteps:
    problems.append(f"sample.num_steps must be in [1, scheduler.num_train_timesteps="
                    f"{config.scheduler.num_train_timesteps}], got {s.num_steps}")
  if s.every < 0 or (s.every and s.num_images < 1):
    problems.append(f"sample.every must be >= 0 and sample.num_images >= 1, got "
                    f"{s.every} and {s.num_images}")
  if s.guidance_scale < 0 or s.eta < 0:
    problems.append(f"sample.guidance_scale and sample.eta must be >= 0, got "
                    f"{s.guidance_scale} and {s.eta}")
  if config.canonical_eye not in ldm_lib.CANONICAL_EYES:
    problems.append(f"canonical_eye must be one of {ldm_lib.CANONICAL_EYES}, got "
                    f"{config.canonical_eye!r}")
  elif config.canonical_eye and not config.flip:
    problems.append("canonical_eye mirrors the other eye's images: it needs flip=True")
  if config.scheduler.timestep_spacing not in ("",) + schedules.TIMESTEP_SPACINGS:
    problems.append(f"scheduler.timestep_spacing must be '' or one of "
                    f"{schedules.TIMESTEP_SPACINGS}, got {config.scheduler.timestep_spacing!r}")
  if config.scheduler.beta_schedule not in schedules.BETA_SCHEDULES:
    problems.append(f"scheduler.beta_schedule must be one of {schedules.BETA_SCHEDULES}, got "
                    f"{config.scheduler.beta_schedule!r}")
  u = config.unet
  if u.prediction_type not in ("epsilon", "v_prediction"):
    problems.append(f"unet.prediction_type must be epsilon or v_prediction, got "
                    f"{u.prediction_type!r}")
  if len(u.cross_attention) != len(u.block_out_channels):
    problems.append(f"unet.cross_attention {tuple(u.cross_attention)} needs one entry per "
                    f"level of unet.block_out_channels {tuple(u.block_out_channels)}")
  for name, channels, groups in (
      ("unet", u.block_out_channels, u.norm_num_groups),
      ("vae", config.vae.block_out_channels, config.vae.norm_num_groups)):
    if any(c % groups for c in channels):
      problems.append(f"{name}.block_out_channels {tuple(channels)} must all be multiples of "
                      f"{name}.norm_num_groups {groups}")
  if config.max_length < 2:
    problems.append(f"max_length must be >= 2 ([CLS] and [SEP]), got {config.max_length}")
  t = config.train
  if not 0 <= t.caption_dropout <= 1:
    problems.append(f"train.caption_dropout must be in [0, 1], got {t.caption_dropout}")
  if not 0 <= t.ema_decay < 1:
    problems.append(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
  if t.snr_gamma < 0:
    problems.append(f"train.snr_gamma must be >= 0 (0 disables), got {t.snr_gamma}")
  if config.unet_init and not ldm_lib.is_params_dir(config.unet_init):
    raise FileNotFoundError(f"unet_init {config.unet_init!r} is not a `fundax convert unet` "
                            f"directory (no {params_io.CONFIG_FILE})")
  if config.vae_checkpoint:
    factor = ldm_lib.vae_config_of(config.vae_checkpoint).downsample_factor
  else:
    factor = 2 ** (len(config.vae.block_out_channels) - 1)
  unet_factor = 2 ** (len(u.block_out_channels) - 1)
  if config.resolution % (factor * unet_factor):
    problems.append(
        f"resolution {config.resolution} must be a multiple of {factor * unet_factor}: the "
        f"VAE downsamples by {factor} and the UNet's {len(u.block_out_channels)} levels by "
        f"{unet_factor} more")
  loop.raise_if_invalid(problems, "LDM")


def with_unet_init(state: state_lib.TrainState, path: str) -> state_lib.TrainState:
  """A fresh state whose UNet params (and EMA) come from a `fundax convert unet` directory.

  The params are restored straight into the state's shardings and dtypes; the optimizer state
  stays fresh (it depends on shapes only). A converted UNet of another architecture fails
  here, naming the first differing parameter.
  """
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state.params)
  params, meta = params_io.load_params(path, "unet", target=target)
  log.info("UNet params from %s (converted from %s)", path, meta.get("source", "?"))
  ema = jax.tree.map(jnp.copy, params) if state.ema_params is not None else None
  return state.replace(params=params, ema_params=ema)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """Trains (or resumes training) the latent diffusion UNet.

  Args:
    config: a configs/ldm.py or configs/sd15_fundus.py config.
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
  rng_init, rng_vae, rng_train, rng_sample, rng_eval = jax.random.split(
      jax.random.key(config.seed, impl=config.prng_impl), 5)
  models, frozen_host, reference = ldm_lib.build_models(config, rng_vae)
  tokenizer = tokenizer_lib.make_tokenizer_from_reference(reference)
  mesh = parallel.make_mesh(config.mesh)
  rules = [tuple(r) for r in config.sharding_rules]
  tx = optim.make_optimizer({**config.optim.to_dict(), "total_steps": config.num_steps})

  def make_state(rng):
    params = models.unet.init(rng, *unet_lib.dummy_inputs(models.unet.config))["params"]
    return state_lib.create(params, tx, ema=config.train.ema_decay > 0)

  def init_state():
    state = parallel.init_sharded(make_state, rng_init, mesh, rules)
    return with_unet_init(state, config.unet_init) if config.unet_init else state

  abstract_state = parallel.abstract_sharded(make_state, rng_init, mesh, rules)
  state_shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
  frozen_shardings = parallel.state_shardings(frozen_host, mesh, rules)
  abstract = {"state": abstract_state, "frozen": jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), frozen_host,
      frozen_shardings)}
  manager = checkpoint.make_manager(workdir, max_to_keep=config.max_to_keep)
  restored, extras, source = checkpoint.restore_or_init(
      manager, abstract, lambda: {
          "state": init_state(),
          "frozen": jax.device_put(frozen_host, frozen_shardings)},
      resume_path=config.resume_path or None)
  state, frozen = restored["state"], restored["frozen"]
  log.info("LDM state from %s at step %d", source, int(state.step))

  if config.cache.enabled:
    batches, step_frozen, batch_keys = _cached_inputs(config, data, workdir, models, frozen,
                                                      tokenizer, reference, mesh)
    step_frozen_shardings = jax.tree.map(lambda _: parallel.replicated(mesh), step_frozen)
  else:
    batches = loop.make_batches(config, data, "train", tokenizer=tokenizer,
                                max_length=config.max_length, mesh=mesh, train=True)
    step_frozen, step_frozen_shardings, batch_keys = frozen, frozen_shardings, BATCH_KEYS
  if extras.get("data"):
    batches.set_state(extras["data"])
  step_fn = parallel.jit_step(
      functools.partial(ldm_step.ldm_train_step, models=models, tx=tx, config=config.train),
      state_shardings, parallel.batch_sharding(mesh), extra_shardings=(step_frozen_shardings,))
  checkpoint_config = {"job": config.to_dict(), "models": ldm_lib.models_to_config(models),
                       "tokenizer": reference, "max_length": config.max_length}

  def save(step, state):
    checkpoint.save(manager, step, {"state": state, "frozen": frozen}, config=checkpoint_config,
                    extras={"data": batches.get_state()})

  writer = metric_writers.MetricWriter(workdir, resume_step=int(state.step))
  eval_fn = jax.jit(functools.partial(ldm_step.ldm_eval_step, models=models,
                                      config=config.train))

  def eval_hook(step, state):
    params = state.ema_params if state.ema_params is not None else state.params
    eval_batches = loop.make_batches(config, data, "validation", tokenizer=tokenizer,
                                     max_length=config.max_length, mesh=mesh, train=False)
    metrics = loop.evaluate(lambda b: eval_fn(params, b, rng_eval, frozen), eval_batches,
                            BATCH_KEYS)
    writer.write(step, metrics, split="eval")

  samples_dir = workdir / "samples"
  prompts = _sample_prompts(config, data, tokenizer, mesh)
  tokens = tokenizer_lib.tokenize(tokenizer, prompts, config.max_length)
  mirror = sampling.eye_mirror(models, prompts)
  generate_fn = sampling.make_generate_fn(models, sampler=config.sample.sampler,
                                          num_steps=config.sample.num_steps)

  def sample_hook(step, state):
    unet_params = state.ema_params if state.ema_params is not None else state.params
    params = {"unet": unet_params, "vae": frozen["vae"], "text": frozen["text"]}
    images = generate_fn(params, tokens["input_ids"], tokens["attention_mask"], rng_sample,
                         config.sample.guidance_scale, config.sample.eta, mirror)
    loop.save_grid(samples_dir / f"step_{step:07d}.png", loop.to_host(images), prompts,
                   synthetic=True,
                   title=f"fundax LDM, step {step}, {config.sample.sampler} "
                   f"{config.sample.num_steps} steps, guidance {config.sample.guidance_scale}")

  try:
    result = loop.train_loop(
        state, step_fn=step_fn, batches=batches, batch_keys=batch_keys, rng=rng_train,
        extra=(step_frozen,), num_steps=config.stop_at_step or config.num_steps, writer=writer,
        log_every=config.log_every, checkpoint_every=config.checkpoint_every, save=save,
        hooks=[loop.Hook(config.eval_every, eval_hook),
               loop.Hook(config.sample.every, sample_hook)],
        max_nonfinite=config.max_nonfinite_steps)
  finally:
    checkpoint.wait(manager)
    manager.close()
    writer.close()
  return loop.outputs(workdir, writer, result, samples_dir, config.num_steps)


def cache_spec(config: ml_collections.ConfigDict, data: ml_collections.ConfigDict,
               frozen: dict[str, Any], models: ldm_lib.Models,
               reference: dict[str, Any]) -> frozen_cache.CacheSpec:
  """What the training split's frozen cache depends on: data files, networks, settings."""
  vae = frozen_cache.fingerprint_arrays(frozen["vae"]) + json.dumps(
      models.vae.config.to_diffusers(), sort_keys=True)
  text = frozen_cache.fingerprint_arrays(frozen["text"]) + json.dumps(
      [models.text.to_config(), reference], sort_keys=True, default=str)
  return frozen_cache.CacheSpec(
      data=frozen_cache.fingerprint_files(datasets.split_files(data, "train")),
      vae=hashlib.sha256(vae.encode()).hexdigest(),
      text=hashlib.sha256(text.encode()).hexdigest(),
      resolution=config.resolution, crop_fov=config.crop_fov, flip=config.flip,
      random_caption_style=config.random_caption_style, max_length=config.max_length)


def _cached_inputs(config, data, workdir, models, frozen, tokenizer, reference, mesh):
  """(batches, the step's frozen inputs, batch keys) when training on the frozen cache.

  The step then needs neither network: latents and token states come with the batch, and the
  empty prompt (caption dropout) is encoded here once.
  """
  frozen_host = jax.device_get(frozen)
  spec = cache_spec(config, data, frozen_host, models, reference)
  cache = frozen_cache.load_or_build(config.cache.dir or workdir / "cache", spec,
                                     datasets.load_from_config(data, "train"), models,
                                     frozen_host, tokenizer)
  batches = frozen_cache.CachedBatches(cache, global_batch_size=config.batch_size,
                                       seed=config.seed, vae_config=models.vae.config, mesh=mesh,
                                       canonical_eye=config.canonical_eye)
  empty = ldm_lib.empty_text(models, frozen["text"], config.max_length)
  return batches, {"empty_text": empty}, frozen_cache.BATCH_KEYS


def _sample_prompts(config, data, tokenizer, mesh) -> list[str]:
  """Captions of the first validation examples: the prompts of every sample grid."""
  batches = loop.make_batches(config, data, "validation", tokenizer=tokenizer,
                              max_length=config.max_length, mesh=mesh, train=False)
  captions = []
  for batch in batches:
    captions += [str(c) for c in batch["caption"]]
    if len(captions) >= config.sample.num_images:
      break
  return captions[:config.sample.num_images]
