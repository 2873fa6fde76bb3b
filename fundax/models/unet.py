"""The text-conditioned denoising UNet, compatible with diffusers' UNet2DConditionModel.

This module owns `UNetConfig` (diffusers' UNet2DConditionModel config.json fields that fundax
implements, plus fundax's own `prediction_type`, `remat` and the lowering fields) and the Flax
`UNet2DConditionModel`. It covers Stable Diffusion 1.x (1x1-conv proj_in/out, one head count)
and 2.x (linear projections, per-block head counts). Inputs and outputs are NHWC.

diffusers' naming quirk is mirrored on purpose: in UNet2DConditionModel, `attention_head_dim`
is really the number of heads per block (head width = block channels // heads), because
`num_attention_heads` defaults to it. Checkpoints rely on that reading.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fundax.models import layers
from fundax.models import unet_blocks
from fundax.models.layers import Dtype

log = logging.getLogger(__name__)

# UNetConfig fields of fundax's own, not in a diffusers config.json.
_FUNDAX_FIELDS = ("prediction_type", "coordinate_input", "remat", "conv_impl",
                  "attention_impl", "attention_chunk", "matmul_dtype")
# ... of which these change what the network computes (stored in fundax checkpoints).
_MODEL_FIELDS = ("prediction_type", "coordinate_input")
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)
# diffusers options outside the SD 1.x / 2.x architecture: a checkpoint must leave them at
# these defaults, or the import would silently drop layers.
_UNSUPPORTED_DEFAULTS = {
    "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
    "only_cross_attention": False, "time_embedding_type": "positional",
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "cross_attention_norm": None,
    "addition_time_embed_dim": None, "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "reverse_transformer_layers_per_block": None,
    "num_attention_heads": None, "resnet_time_scale_shift": "default",
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """UNet2DConditionModel config: diffusers' names and defaults, plus fundax's own fields."""
  sample_size: int | None = None  # latent side the model was trained at
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D", "DownBlock2D")
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D")
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 1280  # width of encoder_hidden_states
  transformer_layers_per_block: int | tuple[int, ...] = 1
  attention_head_dim: int | tuple[int, ...] = 8  # number of heads (diffusers' quirk)
  use_linear_projection: bool = False  # SD 2.x
  # Accepted for checkpoint compatibility; attention softmax always runs in float32 here.
  upcast_attention: bool = False
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  time_embedding_dim: int | None = None
  # fundax only: what the output means ("epsilon", "v_prediction", "sample"), for the
  # diffusion code; the network does not use it.
  prediction_type: str = "epsilon"
  # fundax only: append two constant channels (x and y, -1 to 1 across the latent) to the
  # input of conv_in, which then takes in_channels + 2. A convolution stack only knows where
  # it is from its zero padding; at zero terminal SNR the first sampling step sees pure noise,
  # so a layout the text decides (the optic disc on the eye's side) must come from position.
  # Not a diffusers option: such a UNet is not exported (see `to_diffusers`).
  coordinate_input: bool = False
  # fundax only: rematerialise each down/mid/up block in the backward pass.
  remat: bool = False
  # fundax only, how the same maths is computed (fundax.models.lowering; parameters are the
  # same either way): convolutions "native" or "matmul" (row-tap products, for XLA:CPU) ...
  conv_impl: str = "native"
  # ... attention "xla" or "flash" (cache-blocked, for XLA:CPU; fundax.models.attention) ...
  attention_impl: str = "xla"
  # ... with "xla", attention over chunks of this many queries (0: all at once), bounding
  # the score matrix's memory at high resolution; chunks larger than a block's token count
  # attend in one piece ...
  attention_chunk: int = 0
  # ... and dense / convolution operands: "" (the compute dtype) or "bfloat16" (float32
  # accumulation and output; for CPUs with bfloat16 matrix units).
  matmul_dtype: str = ""

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, list):
        object.__setattr__(self, f.name, tuple(value))
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError("down_block_types, up_block_types and block_out_channels must have the "
                       f"same length, got {self.down_block_types}, {self.up_block_types}, "
                       f"{self.block_out_channels}")
    for t in self.down_block_types:
      if t not in _DOWN_TYPES:
        raise ValueError(f"unsupported down block {t!r}; supported: {_DOWN_TYPES}")
    for t in self.up_block_types:
      if t not in _UP_TYPES:
        raise ValueError(f"unsupported up block {t!r}; supported: {_UP_TYPES}")
    if self.mid_block_type not in _MID_TYPES:
      raise ValueError(f"unsupported mid block {self.mid_block_type!r}")
    for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) and len(value) != n:
        raise ValueError(f"{name} needs one entry per block ({n}), got {value}")
    layers.get_activation(self.act_fn)
    _ = self.lowering  # raises ValueError on an unknown lowering choice

  def per_block(self, name: str) -> tuple[int, ...]:
    """Returns the int-or-tuple field `name` as one value per down block."""
    value = getattr(self, name)
    return (value,) * len(self.block_out_channels) if isinstance(value, int) else tuple(value)

  @property
  def lowering(self) -> layers.Lowering:
    """How the UNet's contractions are computed (raises ValueError on unknown choices)."""
    return layers.Lowering(conv=self.conv_impl, attention=self.attention_impl,
                           attention_chunk=self.attention_chunk, matmul_dtype=self.matmul_dtype)

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @classmethod
  def from_diffusers(cls, config: dict[str, Any], **overrides) -> "UNetConfig":
    """Builds the config from a diffusers UNet2DConditionModel config.json dict.

    Args:
      config: the parsed config.json; keys starting with `_` are diffusers metadata.
      **overrides: fundax fields to set (e.g. `remat=True`, `prediction_type="v_prediction"`).

    Returns:
      The UNetConfig.

    Raises:
      ValueError: the checkpoint uses a diffusers option fundax does not implement.
    """
    for key, default in _UNSUPPORTED_DEFAULTS.items():
      value = config.get(key, default)
      # Per-block lists (e.g. only_cross_attention) are fine when every entry is the default.
      values = value if isinstance(value, (list, tuple)) else [value]
      if any(v != default for v in values):
        raise ValueError(f"unsupported UNet2DConditionModel option {key}={config[key]!r} "
                         f"(fundax implements only {key}={default!r})")
    if config.get("dropout", 0.0):
      log.warning("UNet config has dropout=%s; fundax's UNet has no dropout", config["dropout"])
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names}, **overrides)

  def to_checkpoint(self) -> dict[str, Any]:
    """The diffusers config.json dict plus the fundax fields that change what the network
    computes (prediction_type, coordinate_input): what a fundax checkpoint stores."""
    out = {"_class_name": "UNet2DConditionModel"}
    for k, v in dataclasses.asdict(self).items():
      if k not in _FUNDAX_FIELDS or k in _MODEL_FIELDS:
        out[k] = list(v) if isinstance(v, tuple) else v
    return out

  def to_diffusers(self) -> dict[str, Any]:
    """Returns a diffusers UNet2DConditionModel config.json dict (fundax fields dropped).

    Raises:
      ValueError: the UNet reads coordinate channels, which diffusers' UNet does not add.
    """
    if self.coordinate_input:
      raise ValueError("this UNet reads two coordinate channels (coordinate_input=True) that "
                       "diffusers' UNet2DConditionModel does not add; it has no diffusers form")
    out = {"_class_name": "UNet2DConditionModel"}
    for k, v in dataclasses.asdict(self).items():
      if k not in _FUNDAX_FIELDS:
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


class UNet2DConditionModel(nn.Module):
  """Predicts noise (or v) for latents `sample` at `timesteps` given text token states.

  Attributes:
    config: the architecture.
    dtype: compute dtype (e.g. bfloat16); param_dtype: storage dtype.
  """
  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array | float,
               encoder_hidden_states: jax.Array,
               encoder_attention_mask: jax.Array | None = None) -> jax.Array:
    """Runs the UNet.

    Args:
      sample: [B, h, w, in_channels] noisy latents.
      timesteps: [B] or scalar diffusion timesteps (int or float).
      encoder_hidden_states: [B, L, cross_attention_dim] text token states.
      encoder_attention_mask: optional [B, L] bool, True for tokens to attend to.

    Returns:
      [B, h, w, out_channels] in the compute dtype.
    """
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    lowering = cfg.lowering
    act = layers.get_activation(cfg.act_fn)
    channels = cfg.block_out_channels
    heads = cfg.per_block("attention_head_dim")
    depth = cfg.per_block("layers_per_block")
    tdepth = cfg.per_block("transformer_layers_per_block")
    block_kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, act_fn=cfg.act_fn,
                    use_linear_projection=cfg.use_linear_projection, lowering=lowering, **kw)
    wrap = nn.remat if cfg.remat else (lambda cls: cls)
    context, mask = encoder_hidden_states, encoder_attention_mask

    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    if cfg.center_input_sample:
      sample = 2 * sample - 1.0
    t_emb = layers.timestep_embedding(timesteps, channels[0], cfg.flip_sin_to_cos,
                                      cfg.freq_shift).astype(self.dtype)
    emb = layers.TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, lowering,
                                   name="time_embedding", **kw)(t_emb)  # [B, T]

    if cfg.coordinate_input:
      sample = jnp.concatenate([sample, coordinate_channels(sample)], axis=-1)
    x = layers.conv2d(channels[0], cfg.conv_in_kernel, name="conv_in", lowering=lowering,
                      **kw)(sample)
    skips = (x,)
    for i, block_type in enumerate(cfg.down_block_types):
      cross = block_type == "CrossAttnDownBlock2D"
      x, block_skips = wrap(unet_blocks.DownBlock2D)(
          channels[i], depth[i], num_attention_heads=heads[i] if cross else None,
          transformer_layers=tdepth[i], add_downsample=i < len(channels) - 1,
          downsample_padding=cfg.downsample_padding, name=f"down_blocks_{i}",
          **block_kw)(x, emb, context, mask)
      skips += block_skips

    if cfg.mid_block_type is not None:
      x = wrap(unet_blocks.UNetMidBlock2DCrossAttn)(
          channels[-1], 1, num_attention_heads=heads[-1], transformer_layers=tdepth[-1],
          output_scale_factor=cfg.mid_block_scale_factor, name="mid_block",
          **block_kw)(x, emb, context, mask)

    for i, block_type in enumerate(cfg.up_block_types):
      j = len(channels) - 1 - i  # the matching down block
      n = depth[j] + 1
      block_skips, skips = skips[-n:], skips[:-n]
      # Upsample to the next skip's size: 2x normally, diffusers' upsample_size otherwise.
      size = tuple(skips[-1].shape[1:3]) if j > 0 else None
      cross = block_type == "CrossAttnUpBlock2D"
      x = wrap(unet_blocks.UpBlock2D)(
          channels[j], n, num_attention_heads=heads[j] if cross else None,
          transformer_layers=tdepth[j], upsample_size=size, name=f"up_blocks_{i}",
          **block_kw)(x, block_skips, emb, context, mask)

    x = act(layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
    return layers.conv2d(cfg.out_channels, cfg.conv_out_kernel, name="conv_out",
                         lowering=lowering, **kw)(x)


def coordinate_channels(sample: jax.Array) -> jax.Array:
  """[B, h, w, 2] in sample's dtype: x (left -1 to right 1) and y (top -1 to bottom 1)."""
  b, h, w, _ = sample.shape
  y, x = jnp.meshgrid(jnp.linspace(-1.0, 1.0, h), jnp.linspace(-1.0, 1.0, w), indexing="ij")
  return jnp.broadcast_to(jnp.stack([x, y], -1), (b, h, w, 2)).astype(sample.dtype)


def dummy_inputs(config: UNetConfig, batch: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Small zero inputs with valid shapes, for `init` and `jax.eval_shape`.

  Returns:
    (sample [B, s, s, in], timesteps [B], encoder_hidden_states [B, 1, cross_attention_dim]).
  """
  side = 2 ** len(config.block_out_channels)
  return (jnp.zeros((batch, side, side, config.in_channels), jnp.float32),
          jnp.zeros((batch,), jnp.float32),
          jnp.zeros((batch, 1, config.cross_attention_dim), jnp.float32))


def abstract_params(config: UNetConfig, param_dtype: Dtype = jnp.float32) -> Any:
  """The UNet's parameter tree as `jax.ShapeDtypeStruct`s (no compute, no memory)."""
  model = UNet2DConditionModel(config, param_dtype=param_dtype)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config)))["params"]
