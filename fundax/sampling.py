"""The public text-to-fundus generation API: pure, jittable, vmappable; no host callbacks.

This module owns `Models` (the static description of a latent diffusion model: UNet, VAE,
text encoder, noise schedule) and the functions built on it:

  * `generate(params, models, input_ids, attention_mask, key, ...)`: text encoding, the
    empty-prompt embedding for classifier-free guidance, the reverse diffusion as one
    `lax.scan` (`fundax.diffusion.sample_loop`) and VAE decoding. Call it inside your own
    `jit`/`vmap`; `guidance_scale` and `eta` are traced, so changing them never recompiles.
  * `make_generate_fn(models, ...)`: the same, jitted once for a sampler and step count.
  * `models_to_config` / `models_from_config`: the JSON description a checkpoint carries, and
    `load_pipeline(checkpoint_dir)`, which rebuilds everything from a checkpoint directory
    alone (model configs, tokenizer reference and params are all in it).

Sampling timesteps follow the scheduler config's `timestep_spacing` and `steps_offset` when it
has them (diffusers' names), so a converted Stable Diffusion checkpoint samples on its own
spacing. Prompts: an empty prompt is the unconditional embedding (`[CLS] [SEP]`, exactly what
classifier-free guidance uses), and a prompt longer than the model's token length is
truncated with a WARNING naming it (`tokenize`).

The UNet reads text token states through cross-attention; `Models.text_mask` says whether it
also receives the tokens' attention mask (fundax's own models: yes, so padding is ignored;
Stable Diffusion imports: no).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fundax import checkpoint
from fundax.data import caption_parser
from fundax.data import tokenizer as tokenizer_lib
from fundax.diffusion import samplers
from fundax.diffusion import schedules
from fundax.models import lowering as lowering_lib
from fundax.models import text_encoder as text_lib
from fundax.models import unet as unet_lib
from fundax.models import vae as vae_lib

log = logging.getLogger(__name__)

CANONICAL_EYES = ("", "right")  # "": images in their own orientation


@dataclasses.dataclass(frozen=True, eq=False)
class Models:
  """The modules and schedule of a text-conditioned latent diffusion model (no params).

  Attributes:
    unet: the denoiser; its `config.prediction_type` says what it predicts.
    vae: the autoencoder; its config holds the latent scaling.
    text: the text encoder; its output width must equal the UNet's cross_attention_dim.
    scheduler: diffusers-style scheduler config (see `schedules.make_schedule_from_config`).
    special_tokens: [CLS], [SEP], [PAD] ids of the vocabulary (for the empty prompt).
    text_mask: pass the token attention mask to the UNet's cross-attention.
    canonical_eye: "" or "right": the UNet was trained on every eye in the right eye's
      orientation (left eyes mirrored, captions naming their own eye), so a left-eye prompt's
      image is mirrored after decoding (`eye_mirror`): laterality holds by construction.
    schedule: the noise `Schedule` built from `scheduler` (derived, not an argument).
  """
  unet: unet_lib.UNet2DConditionModel
  vae: vae_lib.AutoencoderKL
  text: text_lib.TextEncoder
  scheduler: dict[str, Any]
  special_tokens: text_lib.SpecialTokens = text_lib.UNCASED_BERT_TOKENS
  text_mask: bool = True
  canonical_eye: str = ""
  schedule: schedules.Schedule = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    if self.canonical_eye not in CANONICAL_EYES:
      raise ValueError(f"canonical_eye must be one of {CANONICAL_EYES}, got "
                       f"{self.canonical_eye!r}")
    # Built once, eagerly and concretely (even if Models is made inside a trace), so that
    # every jit reuses the same constant arrays.
    with jax.ensure_compile_time_eval():
      object.__setattr__(self, "schedule", schedules.make_schedule_from_config(self.scheduler))

  @property
  def prediction_type(self) -> str:
    return self.unet.config.prediction_type

  @property
  def timestep_options(self) -> dict[str, Any]:
    """`timestep_spacing` and `steps_offset` of the scheduler config, for the sampling loop."""
    return {"timestep_spacing": self.scheduler.get("timestep_spacing"),
            "steps_offset": int(self.scheduler.get("steps_offset", 0))}

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    """(h, w, c) of one latent at the UNet's configured sample_size."""
    cfg = self.unet.config
    if cfg.sample_size is None:
      raise ValueError("the UNet config has no sample_size: pass latent_shape explicitly")
    return (cfg.sample_size, cfg.sample_size, cfg.in_channels)


def encode_text(models: Models, text_params, input_ids, attention_mask):
  """Token states [B, L, D] of tokenised prompts (frozen text encoder, deterministic)."""
  return models.text.apply({"params": text_params}, input_ids, attention_mask)


def empty_text(models: Models, text_params, length: int):
  """The empty prompt's token states [1, L, D] and attention mask [1, L] int32."""
  _, mask = text_lib.empty_prompt_ids(length, models.special_tokens)
  states = text_lib.empty_prompt_embedding(models.text, text_params, length,
                                           models.special_tokens)
  return states, mask


def denoise(models: Models, unet_params, x, t, cond):
  """The UNet as the samplers' `denoise_fn`: float32 output for (x [B, h, w, c], t [B], cond).

  Args:
    models: the models.
    unet_params: UNet params.
    x: noisy latents [B, h, w, c].
    t: int timesteps [B].
    cond: (token states [B, L, D], attention mask [B, L]).

  Returns:
    The model output [B, h, w, c] in float32 (sampler maths runs in float32 even when the
    UNet computes in bfloat16).
  """
  states, mask = cond
  mask = mask.astype(bool) if models.text_mask else None
  out = models.unet.apply({"params": unet_params}, x, t, states, mask)
  return out.astype(jnp.float32)


def decode_latents(models: Models, vae_params, latents):
  """Diffusion latents [B, h, w, c] -> images [B, H, W, 3] float32 clipped to [-1, 1]."""
  z = vae_lib.from_latents(latents, models.vae.config)
  images = models.vae.apply({"params": vae_params}, z, method="decode")
  return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)


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
    sampler: "ddim", "ddpm" or "dpm_solver" (static).
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
  latent_shape = tuple(latent_shape or models.latent_shape)
  batch, length = input_ids.shape
  rng_noise, rng_sampler = jax.random.split(key)
  states = encode_text(models, params["text"], input_ids, attention_mask)
  cond = (states, attention_mask)
  uncond = None
  if guidance_scale is not None:
    empty_states, empty_mask = empty_text(models, params["text"], length)
    uncond = (jnp.broadcast_to(empty_states, states.shape).astype(states.dtype),
              jnp.broadcast_to(empty_mask, attention_mask.shape).astype(attention_mask.dtype))
  x_T = jax.random.normal(rng_noise, (batch,) + latent_shape, jnp.float32)
  latents = samplers.sample_loop(
      functools.partial(denoise, models, params["unet"]), models.schedule, x_T, cond, uncond,
      rng_sampler, sampler=sampler, num_steps=num_steps,
      guidance_scale=1.0 if guidance_scale is None else guidance_scale, eta=eta,
      prediction_type=models.prediction_type, **models.timestep_options)
  images = decode_latents(models, params["vae"], latents)
  if mirror is not None:
    images = mirror_images(images, mirror)
  return (images, latents) if return_latents else images


def make_generate_fn(models: Models, *, sampler: str = "ddim", num_steps: int = 50,
                     latent_shape: tuple[int, int, int] | None = None):
  """`generate` jitted once for one sampler, step count and latent shape.

  Args:
    models: the static `Models`.
    sampler: "ddim", "ddpm" or "dpm_solver".
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


def models_to_config(models: Models) -> dict[str, Any]:
  """The JSON-able description of `models` that a checkpoint stores (no params)."""
  unet_config = models.unet.config.to_checkpoint()
  return {
      "unet": unet_config,
      "vae": models.vae.config.to_diffusers(),
      "text": models.text.to_config(),
      "scheduler": dict(models.scheduler),
      "special_tokens": list(models.special_tokens),
      "text_mask": bool(models.text_mask),
      "canonical_eye": models.canonical_eye,
  }


def models_from_config(config: dict[str, Any], *, dtype=jnp.float32,
                       lowering: dict[str, Any] | None = None) -> Models:
  """Rebuilds `Models` from `models_to_config` output (after a JSON round trip too).

  A checkpoint does not store how its UNet is computed (a model trained on one kind of
  hardware is sampled on another): `lowering` sets it.

  Args:
    config: the stored description.
    dtype: compute dtype of the UNet, VAE and text encoder (params stay float32).
    lowering: UNetConfig lowering fields (attention_impl, conv_impl, matmul_dtype, ...);
      None: `lowering.default_for_backend()` (the cache-blocked attention on CPU).

  Returns:
    The Models.
  """
  unet_config = dict(config["unet"])
  prediction_type = unet_config.pop("prediction_type", "epsilon")
  if lowering is None:
    lowering = lowering_lib.default_for_backend()
  return Models(
      unet=unet_lib.UNet2DConditionModel(
          unet_lib.UNetConfig.from_diffusers(unet_config, prediction_type=prediction_type,
                                             **lowering),
          dtype=dtype),
      vae=vae_lib.AutoencoderKL(vae_lib.VAEConfig.from_diffusers(config["vae"]), dtype=dtype),
      text=text_lib.make_text_encoder(config["text"], dtype=dtype),
      scheduler=dict(config["scheduler"]),
      special_tokens=text_lib.SpecialTokens(*config["special_tokens"]),
      text_mask=bool(config["text_mask"]), canonical_eye=config.get("canonical_eye", ""))


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


def _checkpoints_dir(path: str | pathlib.Path) -> pathlib.Path:
  """A run's checkpoints directory, given it or the run's workdir."""
  directory = pathlib.Path(path).absolute()  # Orbax reads no item metadata via relative paths
  if (directory / checkpoint.CHECKPOINT_SUBDIR).is_dir():
    directory = directory / checkpoint.CHECKPOINT_SUBDIR
  return directory


def restore_arrays(path: str, step: int | None = None) -> dict[str, Any]:
  """Reads a checkpoint's array tree as nested dicts of numpy arrays (no target needed).

  Sampling needs only params, and the abstract train state (optimizer included) cannot be
  rebuilt without the training job's code, so the tree is restored as saved, on the host.

  Args:
    path: a run's workdir or its checkpoints directory.
    step: which step; None for the latest.

  Returns:
    The saved `state` item, e.g. {"state": {"params", "ema_params", ...}, "frozen": ...}.
  """
  directory = _checkpoints_dir(path)
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(directory, options=options) as manager:
    step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint step in {directory}")
  item = directory / str(step) / checkpoint.STATE
  with ocp.PyTreeCheckpointer() as reader:
    tree = reader.metadata(item).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return reader.restore(item, args=ocp.args.PyTreeRestore(restore_args=args))


def load_pipeline(checkpoint_dir: str, *, step: int | None = None, use_ema: bool = True,
                  dtype=jnp.float32, lowering: dict[str, Any] | None = None) -> Pipeline:
  """Rebuilds a sampling pipeline from an LDM-trainer checkpoint directory alone.

  Args:
    checkpoint_dir: the trainer's checkpoint directory (`<workdir>/checkpoints`) or workdir.
    step: which checkpoint; None for the latest.
    use_ema: sample with the EMA UNet params (when the checkpoint has them).
    dtype: compute dtype of the rebuilt modules.
    lowering: how the UNet is computed (see `models_from_config`).

  Returns:
    The `Pipeline`.
  """
  directory = _checkpoints_dir(checkpoint_dir)
  config = checkpoint.load_config(directory if step is None else directory / str(step))
  models = models_from_config(config["models"], dtype=dtype, lowering=lowering)
  tokenizer = tokenizer_lib.make_tokenizer_from_reference(config["tokenizer"])
  restored = restore_arrays(directory, step)
  state, frozen = restored["state"], restored["frozen"]
  ema = use_ema and state.get("ema_params") is not None
  params = jax.tree.map(jnp.asarray, {"unet": state["ema_params" if ema else "params"],
                                      "vae": frozen["vae"], "text": frozen["text"]})
  log.info("loaded sampling pipeline from %s (%s UNet params)", checkpoint_dir,
           "EMA" if ema else "raw")
  return Pipeline(models, params, tokenizer, int(config["max_length"]))


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
  from fundax.data import preview  # pylint: disable=g-import-not-at-top  (PIL, fonts)
  if not prompts or num_per_prompt < 1:
    raise ValueError(f"need at least one prompt and --num >= 1, got {len(prompts)} prompts "
                     f"and {num_per_prompt}")
  if sampler not in samplers.SAMPLERS:
    raise ValueError(f"sampler must be one of {samplers.SAMPLERS}, got {sampler!r}")
  pipeline = load_pipeline(checkpoint_dir, use_ema=use_ema)
  expanded = [p for p in prompts for _ in range(num_per_prompt)]
  images = sample_prompts(pipeline, expanded, jax.random.key(seed), sampler=sampler,
                          num_steps=num_steps, guidance_scale=guidance_scale, eta=eta)
  captions = [p or "(empty prompt: unconditional)" for p in expanded]
  grid = preview.make_grid(
      list(images), captions, synthetic=True, columns=min(num_per_prompt, 8), tile=256,
      title=f"fundax sample: {sampler}, {num_steps} steps, guidance {guidance_scale}, "
      f"eta {eta}, seed {seed}")
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  grid.save(out)
  log.info("wrote %s", out)
  return {"grid": str(out), "images": len(expanded), "prompts": list(prompts)}
