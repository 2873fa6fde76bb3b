"""The latent diffusion model bundle: `Models`, its pure functions, and its builders.

This module owns what every stage that runs the text-to-fundus model shares (the LDM
trainer, RLHF, ahead-of-time compilation, evaluation and the public sampling API):

  * `Models`: the static description of a latent diffusion model (UNet, VAE, text encoder,
    noise schedule), and the pure functions on it that the samplers and train steps call:
    `encode_text`, `empty_text`, `denoise` and `decode_latents`.
  * `models_to_config` / `models_from_config`: the JSON description a checkpoint carries, so a
    checkpoint directory alone rebuilds its models (`fundax.sampling.load_pipeline`).
  * The builders an LDM config (configs/ldm.py, configs/sd15_fundus.py) is turned into models
    by: `make_unet_config`, `fresh_vae_config`, `vae_config_of`, `load_vae`, `build_models`.

The UNet reads text token states through cross-attention; `Models.text_mask` says whether it
also receives the tokens' attention mask (fundax's own models: yes, so padding is ignored;
Stable Diffusion imports: no).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fundax import checkpoint
from fundax import parallel
from fundax.data import tokenizer as tokenizer_lib
from fundax.diffusion import schedules
from fundax.interop import params_io
from fundax.models import lowering as lowering_lib
from fundax.models import text_encoder as text_lib
from fundax.models import unet as unet_lib
from fundax.models import vae as vae_lib

log = logging.getLogger(__name__)

CANONICAL_EYES = ("", "right")  # "": images in their own orientation
# The autoencoders that ship with fundax (`fundax convert`-style params directories, trained by
# bench/autoencoder.py --ship), each named by its directory: `vae_checkpoint="phantom-64"`.
SHIPPED_VAES = pathlib.Path(__file__).resolve().parent / "autoencoders"


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
      image is mirrored after decoding (`fundax.sampling.eye_mirror`): laterality holds by
      construction.
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


def _tokenizer_reference(vocab: Any) -> dict[str, Any]:
  """The tokenizer reference for what `load_text_encoder` says its vocabulary is."""
  if isinstance(vocab, dict):
    return vocab
  minilm = tokenizer_lib.minilm_dir()
  if vocab is None or (minilm is not None and pathlib.Path(vocab) == minilm):
    return tokenizer_lib.tokenizer_reference(None)
  return tokenizer_lib.tokenizer_reference(vocab)


def _vocab_dir(reference: dict[str, Any]) -> str | None:
  if "path" in reference:
    path = pathlib.Path(reference["path"])
    return str(path if path.is_dir() else path.parent)
  return str(tokenizer_lib.minilm_dir())


def is_params_dir(path: str) -> bool:
  """Whether `path` is a `fundax convert` params directory (config.json with a "kind")."""
  return (pathlib.Path(path) / params_io.CONFIG_FILE).is_file()


def shipped_vaes() -> list[str]:
  """The names of the autoencoders that ship with fundax."""
  if not SHIPPED_VAES.is_dir():
    return []
  return sorted(p.name for p in SHIPPED_VAES.iterdir() if is_params_dir(str(p)))


def resolve_vae(path: str) -> str:
  """`path` when it exists, else the directory of the autoencoder fundax ships by that name.

  Raises:
    FileNotFoundError: neither, naming the shipped autoencoders.
  """
  if pathlib.Path(path).exists():
    return path
  if path in shipped_vaes():
    return str(SHIPPED_VAES / path)
  raise FileNotFoundError(f"VAE {path!r} is neither a directory nor an autoencoder fundax "
                          f"ships ({', '.join(shipped_vaes()) or 'none'})")


def vae_config_of(path: str) -> vae_lib.VAEConfig:
  """The architecture of a VAE checkpoint (a configs/vae.py run, a convert directory or the
  name of a shipped autoencoder)."""
  path = resolve_vae(path)
  if is_params_dir(path):
    return vae_lib.VAEConfig.from_diffusers(params_io.load_meta(path, "vae")["config"])
  return vae_lib.VAEConfig.from_diffusers(checkpoint.load_config(path)["models"]["vae"])


def load_vae(path: str) -> tuple[vae_lib.VAEConfig, Any]:
  """The VAE config and params of a configs/vae.py run (workdir or checkpoints dir; the EMA
  params when it has them), of a `fundax convert vae` directory (e.g. Stable Diffusion's) or
  of a shipped autoencoder named by `resolve_vae`."""
  path = resolve_vae(path)
  if is_params_dir(path):
    params, meta = params_io.load_params(path, "vae")
    log.info("frozen VAE from converted params %s", path)
    return vae_lib.VAEConfig.from_diffusers(meta["config"]), params
  restored = checkpoint.restore_params(path)
  arrays, models = restored["state"], restored["config"].get("models", {})
  if "vae" not in models or models.get("unet") is not None:
    raise ValueError(f"vae_checkpoint {path} is not a VAE run (fundax train vae)")
  params = arrays["ema_params"] if arrays.get("ema_params") is not None else arrays["params"]
  log.info("frozen VAE from %s", restored["step_dir"])
  return vae_lib.VAEConfig.from_diffusers(models["vae"]), params["vae"]


def fresh_vae_config(config: ml_collections.ConfigDict) -> vae_lib.VAEConfig:
  """The architecture of the freshly initialised VAE used when no vae_checkpoint is given."""
  levels = len(config.vae.block_out_channels)
  return vae_lib.VAEConfig(
      block_out_channels=tuple(config.vae.block_out_channels),
      down_block_types=("DownEncoderBlock2D",) * levels,
      up_block_types=("UpDecoderBlock2D",) * levels,
      layers_per_block=config.vae.layers_per_block,
      latent_channels=config.vae.latent_channels, norm_num_groups=config.vae.norm_num_groups,
      sample_size=config.resolution, scaling_factor=config.vae.scaling_factor)


def make_unet_config(config: ml_collections.ConfigDict, vae_config: vae_lib.VAEConfig,
                     cross_attention_dim: int) -> unet_lib.UNetConfig:
  """The UNet an LDM config's `unet` section describes, on the VAE's latents."""
  u = config.unet
  down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.cross_attention)
  up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.cross_attention))
  return unet_lib.UNetConfig(
      sample_size=config.resolution // vae_config.downsample_factor,
      in_channels=vae_config.latent_channels, out_channels=vae_config.latent_channels,
      block_out_channels=tuple(u.block_out_channels), down_block_types=down,
      up_block_types=up, layers_per_block=u.layers_per_block,
      cross_attention_dim=cross_attention_dim, attention_head_dim=u.attention_head_dim,
      norm_num_groups=u.norm_num_groups, prediction_type=u.prediction_type,
      coordinate_input=u.coordinate_input, remat=u.remat,
      attention_chunk=u.attention_chunk, attention_impl=u.attention_impl,
      conv_impl=u.conv_impl, matmul_dtype=u.matmul_dtype)


def build_models(config: ml_collections.ConfigDict, rng: jax.Array):
  """The models and the frozen networks' params an LDM config describes.

  Args:
    config: a configs/ldm.py config.
    rng: initialises a fresh VAE (when `vae_checkpoint` is empty).

  Returns:
    (models, frozen params {"vae", "text"}, tokenizer reference).
  """
  dtype = jnp.dtype(config.dtype)
  text, text_params, vocab = text_lib.load_text_encoder(config.text_encoder, dtype=dtype)
  reference = _tokenizer_reference(vocab)
  if config.vae_checkpoint:
    vae_config, vae_params = load_vae(config.vae_checkpoint)
  else:
    log.warning("no vae_checkpoint: training on the latents of a RANDOM frozen VAE "
                "(smoke tests only)")
    vae_config = fresh_vae_config(config)
    image = jnp.zeros((1, config.resolution, config.resolution, 3))
    vae_params = parallel.jit_once(vae_lib.AutoencoderKL(vae_config).init)(rng, image)["params"]
  if config.resolution % vae_config.downsample_factor:
    raise ValueError(f"resolution {config.resolution} is not a multiple of the VAE's "
                     f"downsampling factor {vae_config.downsample_factor}")
  unet_config = make_unet_config(config, vae_config, text.output_dim)
  models = Models(
      unet=unet_lib.UNet2DConditionModel(unet_config, dtype=dtype),
      vae=vae_lib.AutoencoderKL(vae_config, dtype=dtype), text=text,
      scheduler=config.scheduler.to_dict(),
      special_tokens=text_lib.special_tokens(_vocab_dir(reference)),
      text_mask=config.unet.text_mask, canonical_eye=config.canonical_eye)
  return models, {"vae": vae_params, "text": text_params}, reference
