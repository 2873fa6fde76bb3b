"""The public text-to-fundus generation API: pure, jittable, vmappable; no host callbacks.

This module owns generation from a `Models` bundle (`fundax.models.ldm`, re-exported here as
`sampling.Models`) and from checkpoints:

  * `generate(params, models, input_ids, attention_mask, key, ...)`: text encoding, the
    empty-prompt embedding for classifier-free guidance, the reverse diffusion as one
    `lax.scan` (`fundax.diffusion.sample_loop`) and VAE decoding. Call it inside your own
    `jit`/`vmap`; `guidance_scale` and `eta` are traced, so changing them never recompiles.
  * `make_generate_fn(models, ...)`: the same, jitted once for a sampler and step count.
  * `conditioning` and `sample_conditioned`: `generate`'s two halves (text encoding; noise,
    sampling, decoding), which RLHF rollouts call to keep the trajectory and its log-probs.
  * `load_pipeline(checkpoint_dir)`, which rebuilds everything from a checkpoint directory
    alone (model configs, tokenizer reference and params are all in it), and the host
    conveniences built on it (`sample_prompts`, `write_sample_grid`).

Sampling timesteps follow the scheduler config's `timestep_spacing` and `steps_offset` when it
has them (diffusers' names), so a converted Stable Diffusion checkpoint samples on its own
spacing. Prompts: an empty prompt is the unconditional embedding (`[CLS] [SEP]`, exactly what
classifier-free guidance uses), and a prompt longer than the model's token length is
truncated with a WARNING naming it (`tokenize`).
"""

from __future__ import annotations

import functools
import logging
import math
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fundax import checkpoint
from fundax.data import caption_parser
from fundax.data import tokenizer as tokenizer_lib
from fundax.diffusion import registry
from fundax.diffusion import samplers
from fundax.models import ldm as ldm_lib

log = logging.getLogger(__name__)

# The model bundle lives in `fundax.models.ldm`; re-exported here because users build one to
# call `generate` with converted weights (colab/03_sampling.ipynb, the README).
Models = ldm_lib.Models


def eye_mirror(models: Models, prompts: list[str]) -> np.ndarray:
  """bool [B]: which prompts' images to mirror after decoding (a stated eye other than the
  model's canonical one; all False for a model without one). A prompt that states no eye
  gets the canonical orientation."""
  if not models.canonical_eye:
    return np.zeros(len(prompts), bool)
  eyes = [caption_parser.parse_caption(p).laterality for p in prompts]
  return np.array([e is not None and e != models.canonical_eye for e in eyes], bool)


def mirror_images(images, mirror):
  """Images [B, H, W, C] with those where `mirror` [B] is true flipped left-right."""
  return jnp.where(jnp.asarray(mirror)[:, None, None, None], images[:, :, ::-1], images)


def conditioning(models: Models, text_params, input_ids, attention_mask, *,
                 guidance: bool = True):
  """The text conditioning of `generate`: (cond, uncond), batch-first.

  Args:
    models: the static `Models`.
    text_params: the text encoder's params.
    input_ids: int [B, L] token ids.
    attention_mask: int [B, L].
    guidance: also build the empty prompt's conditioning (classifier-free guidance).

  Returns:
    cond = (token states [B, L, D], attention_mask), and uncond, the empty prompt's (states,
    mask) broadcast to cond's shapes, or None without guidance.
  """
  states = ldm_lib.encode_text(models, text_params, input_ids, attention_mask)
  if not guidance:
    return (states, attention_mask), None
  empty_states, empty_mask = ldm_lib.empty_text(models, text_params, input_ids.shape[1])
  uncond = (jnp.broadcast_to(empty_states, states.shape).astype(states.dtype),
            jnp.broadcast_to(empty_mask, attention_mask.shape).astype(attention_mask.dtype))
  return (states, attention_mask), uncond


def sample_conditioned(params, models: Models, cond, uncond, key, *, sampler: str,
                       num_steps: int, guidance_scale=7.5, eta=0.0, mirror=None,
                       latent_shape: tuple[int, int, int] | None = None,
                       return_trajectory: bool = False):
  """`generate` after text encoding: noise, the reverse diffusion, decoding, mirroring.

  RLHF rollouts call it with `return_trajectory` (the policy's steps and their log-probs), so
  their images are `generate`'s for the same key.

  Args:
    params: {"unet": ..., "vae": ...} (a "text" entry is ignored).
    models: the static `Models`.
    cond, uncond: from `conditioning`.
    key: PRNG key, split into the initial noise's and the sampler's.
    sampler, num_steps, guidance_scale, eta, mirror, latent_shape: as for `generate`.
    return_trajectory: also return the `fundax.diffusion.Trajectory` (static).

  Returns:
    (images [B, H, W, 3] float32 in [-1, 1], final latents [B, h, w, c], the trajectory or
    None).
  """
  latent_shape = tuple(latent_shape or models.latent_shape)
  rng_noise, rng_sampler = jax.random.split(key)
  x_T = jax.random.normal(rng_noise, (cond[0].shape[0],) + latent_shape, jnp.float32)
  out = samplers.sample_loop(
      functools.partial(ldm_lib.denoise, models, params["unet"]), models.schedule, x_T, cond,
      uncond, rng_sampler, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
      eta=eta, prediction_type=models.prediction_type, return_trajectory=return_trajectory,
      **models.timestep_options)
  latents, trajectory = out if return_trajectory else (out, None)
  images = ldm_lib.decode_latents(models, params["vae"], latents)
  if mirror is not None:
    images = mirror_images(images, mirror)
  return images, latents, trajectory


def generate(params, models: Models, input_ids, attention_mask, key, *, sampler: str = "ddim",
             num_steps: int = 50, guidance_scale=7.5, eta=0.0, mirror=None,
             latent_shape: tuple[int, int, int] | None = None, return_latents: bool = False):
  """Generates images from tokenised prompts. Pure and jittable; vmap it over keys freely.

  Args:
    params: {"unet": ..., "vae": ..., "text": ...}.
    models: the static `Models`.
    input_ids: int [B, L] token ids (see `fundax.data.tokenizer.tokenize`).
    attention_mask: int [B, L], 1 for tokens, 0 for padding.
    key: PRNG key; the initial noise and every stochastic step derive from it.
    sampler: a registered sampler's name (`fundax.diffusion.registry`; static).
    num_steps: reverse-diffusion steps (static).
    guidance_scale: classifier-free guidance weight (traced); None (static) disables guidance
      and halves the UNet work.
    eta: DDIM stochasticity, 0 = deterministic (traced).
    mirror: optional bool [B] (traced): images to flip left-right after decoding, for a model
      with a canonical eye (`tokenize_prompts(...)["mirror"]`, `eye_mirror`); None: none.
    latent_shape: (h, w, c) of a latent (static); default from the UNet's sample_size.
    return_latents: also return the final latents (static; in the canonical orientation).

  Returns:
    Images [B, H, W, 3] float32 in [-1, 1]; with return_latents, (images, latents [B, h, w, c]).
  """
  cond, uncond = conditioning(models, params["text"], input_ids, attention_mask,
                              guidance=guidance_scale is not None)
  images, latents, _ = sample_conditioned(
      params, models, cond, uncond, key, sampler=sampler, num_steps=num_steps,
      guidance_scale=1.0 if guidance_scale is None else guidance_scale, eta=eta, mirror=mirror,
      latent_shape=latent_shape)
  return (images, latents) if return_latents else images


def make_generate_fn(models: Models, *, sampler: str = "ddim", num_steps: int = 50,
                     latent_shape: tuple[int, int, int] | None = None):
  """`generate` jitted once for one sampler, step count and latent shape.

  Args:
    models: the static `Models`.
    sampler: a registered sampler's name (`fundax.diffusion.registry`).
    num_steps: reverse-diffusion steps.
    latent_shape: (h, w, c); default from the UNet's sample_size.

  Returns:
    `fn(params, input_ids, attention_mask, key, guidance_scale=7.5, eta=0.0, mirror=None)
    -> images`; guidance_scale, eta and mirror are traced, so new values reuse the compiled
    program.
  """
  @jax.jit
  def generate_fn(params, input_ids, attention_mask, key, guidance_scale=7.5, eta=0.0,
                  mirror=None):
    return generate(params, models, input_ids, attention_mask, key, sampler=sampler,
                    num_steps=num_steps, guidance_scale=guidance_scale, eta=eta,
                    mirror=mirror, latent_shape=latent_shape)
  return generate_fn


class Pipeline(NamedTuple):
  """Everything needed to sample from a trained checkpoint.

  Attributes:
    models: the static models.
    params: {"unet": (EMA) UNet params, "vae": ..., "text": ...}.
    tokenizer: the tokenizer the model was trained with.
    max_length: token sequence length L it was trained with.
  """
  models: Models
  params: Any
  tokenizer: Any
  max_length: int


def load_pipeline(checkpoint_dir: str, *, step: int | None = None, use_ema: bool = True,
                  dtype=jnp.float32, lowering: dict[str, Any] | None = None) -> Pipeline:
  """Rebuilds a sampling pipeline from an LDM-trainer checkpoint directory alone.

  The checkpoint is read by `fundax.checkpoint.restore_params`: verified, and the latest intact
  step when the newest is damaged (with a WARNING naming it).

  Args:
    checkpoint_dir: the trainer's checkpoint directory (`<workdir>/checkpoints`) or workdir.
    step: which checkpoint; None for the latest intact one.
    use_ema: sample with the EMA UNet params (when the checkpoint has them).
    dtype: compute dtype of the rebuilt modules.
    lowering: how the UNet is computed (see `ldm_lib.models_from_config`).

  Returns:
    The `Pipeline`.

  Raises:
    FileNotFoundError, checkpoint.CheckpointError: naming the path or the damaged steps.
    ValueError: the checkpoint is not a text-to-image LDM's (e.g. a VAE or Selector run).
  """
  restored = checkpoint.restore_params(checkpoint_dir, step=step)
  config, state, frozen = restored["config"], restored["state"], restored["frozen"]
  check_ldm_config(config, restored["step_dir"])
  if state.get("params") is None or not frozen or set(frozen) != {"vae", "text"}:
    raise ValueError(f"checkpoint step {restored['step_dir']} holds no UNet params with a frozen "
                     "VAE and text encoder: it is not an LDM run's (fundax train ldm)")
  models = ldm_lib.models_from_config(config["models"], dtype=dtype, lowering=lowering)
  tokenizer = tokenizer_lib.make_tokenizer_from_reference(config["tokenizer"])
  ema = use_ema and state.get("ema_params") is not None
  params = jax.tree.map(jnp.asarray, {"unet": state["ema_params" if ema else "params"],
                                      "vae": frozen["vae"], "text": frozen["text"]})
  log.info("loaded sampling pipeline from %s (%s UNet params)", restored["step_dir"],
           "EMA" if ema else "raw")
  return Pipeline(models, params, tokenizer, int(config["max_length"]))


def check_ldm_config(config: dict[str, Any], where: str) -> None:
  """Raises ValueError unless a checkpoint's config describes a text-to-image LDM.

  Args:
    config: the checkpoint's config (`fundax.checkpoint.load_config`).
    where: the checkpoint's directory, for the message.
  """
  models = config.get("models") if isinstance(config, dict) else None
  missing = [k for k in ("unet", "vae", "text", "scheduler") if k not in (models or {})]
  missing += [k for k in ("tokenizer", "max_length") if k not in config]
  if missing:
    have = f"models {sorted(models)}" if isinstance(models, dict) and models else "no models"
    raise ValueError(f"{where} is not an LDM checkpoint (its config has {have} and lacks "
                     f"{missing}): give the workdir of `fundax train ldm` or an RLHF run's "
                     "best/ directory")


def tokenize(tokenizer: Any, prompts: list[str], max_length: int) -> dict[str, np.ndarray]:
  """Host-side tokenisation of user prompts for `generate`, checked.

  Args:
    tokenizer: the model's tokenizer.
    prompts: B strings; "" (or None, or only whitespace) is the empty prompt, whose tokens are
      exactly the unconditional input of classifier-free guidance.
    max_length: the model's token length L.

  Returns:
    int32 "input_ids" and "attention_mask" [B, L]. Prompts longer than L tokens are
    truncated (keeping [SEP] last), each with a WARNING giving its length.
  """
  prompts = [" ".join((p or "").split()) for p in prompts]
  for i, prompt in enumerate(prompts):
    length = len(tokenizer(prompt, truncation=False)["input_ids"]) if prompt else 2
    if length > max_length:
      log.warning("prompt %d has %d tokens, more than the model's %d: truncated to %r", i,
                  length, max_length, tokenizer.decode(
                      tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"],
                      skip_special_tokens=True))
  return tokenizer_lib.tokenize(tokenizer, prompts, max_length)


def tokenize_prompts(pipeline: Pipeline, prompts: list[str]) -> dict[str, np.ndarray]:
  """`tokenize` with a pipeline's tokenizer and token length, plus "mirror" (`eye_mirror`)."""
  return {**tokenize(pipeline.tokenizer, list(prompts), pipeline.max_length),
          "mirror": eye_mirror(pipeline.models, list(prompts))}


def sample_prompts(pipeline: Pipeline, prompts: list[str], key, *, sampler: str = "ddim",
                   num_steps: int = 50, guidance_scale: float | None = 7.5,
                   eta: float = 0.0) -> np.ndarray:
  """Host convenience for the CLI and notebooks: prompts in, numpy images out.

  Args:
    pipeline: from `load_pipeline`.
    prompts: B prompt strings.
    key: PRNG key.
    sampler, num_steps, guidance_scale, eta: as for `generate`.

  Returns:
    float32 numpy images [B, H, W, 3] in [-1, 1].
  """
  tokens = tokenize_prompts(pipeline, prompts)
  images = jax.jit(functools.partial(
      generate, models=pipeline.models, sampler=sampler, num_steps=num_steps))(
          pipeline.params, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
          key=key, guidance_scale=guidance_scale, eta=eta, mirror=tokens["mirror"])
  return np.asarray(images)


def check_finite(images, what: str) -> np.ndarray:
  """`images` as numpy, or FloatingPointError when any pixel is NaN/inf.

  Damaged or diverged weights (or a non-finite guidance weight) make NaN images, which a PNG
  would show as black and a metric as NaN: they stop here with a message instead.
  """
  images = np.asarray(images)
  bad = ~np.isfinite(images).reshape(len(images), -1).all(axis=1) if images.size else []
  if np.any(bad):
    raise FloatingPointError(f"{what}: {int(np.sum(bad))} of {len(images)} images hold NaN/inf "
                             "pixels (damaged or diverged weights, or a non-finite guidance "
                             "weight); nothing was written")
  return images


def write_sample_grid(checkpoint_dir: str, prompts: list[str], out: str | pathlib.Path, *,
                      num_per_prompt: int = 4, sampler: str = "ddim", num_steps: int = 50,
                      guidance_scale: float = 7.5, eta: float = 0.0, seed: int = 0,
                      use_ema: bool = True) -> dict[str, Any]:
  """`fundax sample`: images for each prompt from a checkpoint, as one SYNTHETIC-stamped PNG.

  Args:
    checkpoint_dir: an LDM run's workdir or checkpoints directory.
    prompts: prompt strings ("" = unconditional); each gets `num_per_prompt` images.
    out: the PNG to write (parent directories are created).
    num_per_prompt: images per prompt (one row each when <= 8).
    sampler, num_steps, guidance_scale, eta: as for `generate`.
    seed: root of the initial noise.
    use_ema: sample with the EMA UNet params when the checkpoint has them.

  Returns:
    {"grid": path, "images": count, "prompts": the prompts}.
  """
  from fundax import images as images_lib  # pylint: disable=g-import-not-at-top  (PIL, fonts)
  if not prompts or num_per_prompt < 1:
    raise ValueError(f"need at least one prompt and --num >= 1, got {len(prompts)} prompts "
                     f"and {num_per_prompt}")
  registry.get_sampler(sampler)  # an unknown name fails before the checkpoint is read
  if not (math.isfinite(guidance_scale) and math.isfinite(eta) and eta >= 0):
    raise ValueError(f"guidance_scale must be finite and eta finite and >= 0, got "
                     f"{guidance_scale} and {eta}")
  pipeline = load_pipeline(checkpoint_dir, use_ema=use_ema)
  train_steps = pipeline.models.schedule.num_train_timesteps
  if not 1 <= num_steps <= train_steps:
    raise ValueError(f"num_steps must be in [1, {train_steps}] (the model's training "
                     f"timesteps), got {num_steps}")
  expanded = [p for p in prompts for _ in range(num_per_prompt)]
  images = check_finite(sample_prompts(
      pipeline, expanded, jax.random.key(seed), sampler=sampler, num_steps=num_steps,
      guidance_scale=guidance_scale, eta=eta), f"the images sampled from {checkpoint_dir}")
  captions = [p or "(empty prompt: unconditional)" for p in expanded]
  grid = images_lib.save_grid(
      out, images, captions, synthetic=True, columns=min(num_per_prompt, 8), tile=256,
      title=f"fundax sample: {sampler}, {num_steps} steps, guidance {guidance_scale}, "
      f"eta {eta}, seed {seed}")
  return {"grid": grid, "images": len(expanded), "prompts": list(prompts)}
