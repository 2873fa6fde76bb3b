"""The KL autoencoder (Stable Diffusion's VAE), architecture-compatible with diffusers.

This module owns `VAEConfig` (the fields of diffusers' AutoencoderKL config.json), the Flax
`AutoencoderKL` with its Encoder/Decoder and blocks, the `DiagonalGaussian` posterior, and the
latent scaling that the diffusion model sees (`to_latents` / `from_latents`). Images are NHWC
in [-1, 1]; latents are NHWC with `latent_channels` channels at 1 / 2^(levels - 1) resolution.
Parameter names mirror diffusers' module names (see `fundax.models.layers`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from fundax.models import layers
from fundax.models.layers import Dtype

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """diffusers' AutoencoderKL config (the subset fundax implements, same names and defaults)."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = (_DOWN_BLOCK,)
  up_block_types: tuple[str, ...] = (_UP_BLOCK,)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32  # image side in pixels the model was trained at
  scaling_factor: float = 0.18215  # latents seen by the UNet are (z - shift) * scaling_factor
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    for name in ("down_block_types", "up_block_types", "block_out_channels", "latents_mean",
                 "latents_std"):
      value = getattr(self, name)
      if isinstance(value, list):
        object.__setattr__(self, name, tuple(value))
    if any(t != _DOWN_BLOCK for t in self.down_block_types):
      raise ValueError(f"only {_DOWN_BLOCK} is supported, got {self.down_block_types}")
    if any(t != _UP_BLOCK for t in self.up_block_types):
      raise ValueError(f"only {_UP_BLOCK} is supported, got {self.up_block_types}")
    if not len(self.down_block_types) == len(self.up_block_types) == len(
        self.block_out_channels):
      raise ValueError("down_block_types, up_block_types and block_out_channels must have the "
                       "same length")
    layers.get_activation(self.act_fn)

  @classmethod
  def from_diffusers(cls, config: dict[str, Any]) -> "VAEConfig":
    """Builds the config from a diffusers config.json dict; unknown keys are ignored.

    Args:
      config: the parsed `config.json` of an AutoencoderKL (keys starting with `_` are
        diffusers metadata).

    Returns:
      The VAEConfig.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names})

  def to_diffusers(self) -> dict[str, Any]:
    """Returns the config as a diffusers AutoencoderKL config.json dict."""
    out = {"_class_name": "AutoencoderKL"}
    for k, v in dataclasses.asdict(self).items():
      out[k] = list(v) if isinstance(v, tuple) else v
    return out

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each side."""
    return 2 ** (len(self.block_out_channels) - 1)


@flax.struct.dataclass
class DiagonalGaussian:
  """The encoder's posterior N(mean, exp(logvar)), a pytree of two [B, h, w, c] arrays."""
  mean: jax.Array
  logvar: jax.Array

  def sample(self, rng: jax.Array) -> jax.Array:
    """Draws z = mean + std * eps with eps ~ N(0, 1) from `rng`."""
    eps = jax.random.normal(rng, self.mean.shape, jnp.float32).astype(self.mean.dtype)
    return self.mean + jnp.exp(0.5 * self.logvar) * eps

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, 1)) summed over latent pixels and channels: [B]."""
    var = jnp.exp(self.logvar)
    return 0.5 * jnp.sum(jnp.square(self.mean) + var - 1.0 - self.logvar, axis=(1, 2, 3))


def to_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
  """Scales raw VAE latents to the diffusion model's latent space."""
  return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def from_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
  """Inverse of `to_latents`: diffusion latents back to the decoder's input scale."""
  return latents / config.scaling_factor + (config.shift_factor or 0.0)


class MidBlock2D(nn.Module):
  """diffusers' UNetMidBlock2D without time embedding: resnet, spatial attention, resnet."""
  groups: int
  act_fn: str
  add_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, H, W, C]. Returns [B, H, W, C]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    res = lambda i: layers.ResnetBlock2D(c, self.groups, act_fn=self.act_fn, name=f"resnets_{i}",
                                         **kw)
    x = res(0)(x)
    if self.add_attention:
      # One head over all channels (diffusers: attention_head_dim = channels).
      x = layers.Attention(1, c, bias=True, norm_num_groups=self.groups, eps=1e-6,
                           residual_connection=True, name="attentions_0", **kw)(x)
    return res(1)(x)


class Encoder(nn.Module):
  """diffusers' VAE Encoder: image [B, H, W, in] -> moments [B, h, w, 2 * latent]."""
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = lambda f, name: layers.conv2d(f, 3, name=name, **kw)
    x = conv(cfg.block_out_channels[0], "conv_in")(x)
    for i, ch in enumerate(cfg.block_out_channels):
      x = DownEncoderBlock2D(ch, cfg.layers_per_block, cfg.norm_num_groups, cfg.act_fn,
                             add_downsample=i < len(cfg.block_out_channels) - 1,
                             name=f"down_blocks_{i}", **kw)(x)
    x = MidBlock2D(cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention,
                   name="mid_block", **kw)(x)
    x = layers.group_norm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x)
    return conv(2 * cfg.latent_channels, "conv_out")(layers.get_activation(cfg.act_fn)(x))


class Decoder(nn.Module):
  """diffusers' VAE Decoder: latent [B, h, w, latent] -> image [B, H, W, out]."""
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = lambda f, name: layers.conv2d(f, 3, name=name, **kw)
    x = conv(cfg.block_out_channels[-1], "conv_in")(z)
    x = MidBlock2D(cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention,
                   name="mid_block", **kw)(x)
    for i, ch in enumerate(reversed(cfg.block_out_channels)):
      x = UpDecoderBlock2D(ch, cfg.layers_per_block + 1, cfg.norm_num_groups, cfg.act_fn,
                           add_upsample=i < len(cfg.block_out_channels) - 1,
                           name=f"up_blocks_{i}", **kw)(x)
    x = layers.group_norm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x)
    return conv(cfg.out_channels, "conv_out")(layers.get_activation(cfg.act_fn)(x))


class DownEncoderBlock2D(nn.Module):
  """Resnets then (except in the last block) a stride-2 conv with diffusers' (0, 1) padding."""
  out_channels: int
  num_layers: int
  groups: int
  act_fn: str
  add_downsample: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = layers.ResnetBlock2D(self.out_channels, self.groups, act_fn=self.act_fn,
                               name=f"resnets_{i}", **kw)(x)
    if self.add_downsample:
      x = layers.Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """Resnets then (except in the last block) nearest 2x upsampling and a conv."""
  out_channels: int
  num_layers: int
  groups: int
  act_fn: str
  add_upsample: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = layers.ResnetBlock2D(self.out_channels, self.groups, act_fn=self.act_fn,
                               name=f"resnets_{i}", **kw)(x)
    if self.add_upsample:
      x = layers.Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
    return x


class AutoencoderKL(nn.Module):
  """Stable Diffusion's KL-regularised autoencoder.

  Use `model.apply(variables, x, method="encode")`, `method="decode"`, or call it for a
  reconstruction.

  Attributes:
    config: the architecture.
    dtype: compute dtype; param_dtype: storage dtype.
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    if cfg.use_quant_conv:
      self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), **kw)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), **kw)

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    """Args: x [B, H, W, in_channels] images in [-1, 1]. Returns the posterior over z."""
    moments = self.encoder(x)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

  def decode(self, z: jax.Array) -> jax.Array:
    """Args: z [B, h, w, latent_channels] (unscaled latents). Returns [B, H, W, out_channels]."""
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Reconstructs `x` through the posterior mean, or a posterior sample when `rng` is given.

    Args:
      x: [B, H, W, in_channels] images.
      rng: optional key to sample z instead of taking the mean.

    Returns:
      [B, H, W, out_channels] reconstruction.
    """
    posterior = self.encode(x)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return self.decode(z)


def abstract_params(config: VAEConfig, param_dtype: Dtype = jnp.float32) -> Any:
  """The VAE's parameter tree as `jax.ShapeDtypeStruct`s (no compute, no memory)."""
  model = AutoencoderKL(config, param_dtype=param_dtype)
  side = 2 ** len(config.block_out_channels)
  x = jnp.zeros((1, side, side, config.in_channels), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
