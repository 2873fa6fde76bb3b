"""The UNet's down, mid and up blocks, mirroring diffusers' unet_2d_blocks.

This module owns `DownBlock2D` (diffusers' DownBlock2D, or CrossAttnDownBlock2D when given
attention heads), `UNetMidBlock2DCrossAttn` and `UpBlock2D` (UpBlock2D / CrossAttnUpBlock2D).
Input channel counts are never configured: Flax infers them, so a block only needs its output
width. Parameter names are diffusers' (`resnets_<i>`, `attentions_<i>`, `downsamplers_0`,
`upsamplers_0`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fundax.models import layers
from fundax.models.layers import Dtype


class _BlockOptions(nn.Module):
  """Fields shared by all UNet blocks (diffusers passes these to every block)."""
  out_channels: int
  num_layers: int
  groups: int = 32
  eps: float = 1e-5
  act_fn: str = "silu"
  # Cross-attention: None means no attention (DownBlock2D / UpBlock2D).
  num_attention_heads: int | None = None
  transformer_layers: int = 1
  use_linear_projection: bool = False
  lowering: layers.Lowering = layers.Lowering()  # how contractions are computed
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def resnet(self, i: int, output_scale_factor: float = 1.0) -> layers.ResnetBlock2D:
    return layers.ResnetBlock2D(self.out_channels, self.groups, eps=self.eps, act_fn=self.act_fn,
                                output_scale_factor=output_scale_factor,
                                lowering=self.lowering, dtype=self.dtype,
                                param_dtype=self.param_dtype, name=f"resnets_{i}")

  def attention(self, i: int) -> layers.Transformer2DModel:
    heads = self.num_attention_heads
    # diffusers: head width = block channels // heads.
    return layers.Transformer2DModel(heads, self.out_channels // heads, self.transformer_layers,
                                     self.groups, self.use_linear_projection,
                                     lowering=self.lowering, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=f"attentions_{i}")


class DownBlock2D(_BlockOptions):
  """Resnets (each followed by a Transformer2DModel if `num_attention_heads`), then downsample.

  Attributes (beyond the shared ones):
    add_downsample: end with a stride-2 conv (all but the last block).
    downsample_padding: diffusers' `downsample_padding` (1 for SD).
  """
  add_downsample: bool = True
  downsample_padding: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Runs the block.

    Args:
      x: [B, H, W, Cin]; temb: [B, T]; context: [B, S, D]; context_mask: [B, S] or None.

    Returns:
      (output [B, H', W', out_channels], skip activations for the up path, in order).
    """
    skips = ()
    for i in range(self.num_layers):
      x = self.resnet(i)(x, temb)
      if self.num_attention_heads is not None:
        x = self.attention(i)(x, context, context_mask)
      skips += (x,)
    if self.add_downsample:
      x = layers.Downsample2D(self.out_channels, self.downsample_padding,
                              lowering=self.lowering, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="downsamplers_0")(x)
      skips += (x,)
    return x, skips


class UNetMidBlock2DCrossAttn(_BlockOptions):
  """Resnet, then `num_layers` x (Transformer2DModel, resnet); residuals scaled as diffusers."""
  output_scale_factor: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array,
               context_mask: jax.Array | None = None) -> jax.Array:
    """Args: x [B, h, w, C]; temb [B, T]; context [B, S, D]. Returns [B, h, w, C]."""
    x = self.resnet(0, self.output_scale_factor)(x, temb)
    for i in range(self.num_layers):
      x = self.attention(i)(x, context, context_mask)
      x = self.resnet(i + 1, self.output_scale_factor)(x, temb)
    return x


class UpBlock2D(_BlockOptions):
  """Resnets over [x, skip] concatenations (plus cross-attention if heads), then upsample.

  Attributes (beyond the shared ones):
    upsample_size: (H, W) to upsample to at the end, or None for no upsampling (last block).
      The UNet sets it from the next skip's shape, which covers odd sizes like diffusers'
      `upsample_size`.
  """
  upsample_size: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array,
               context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    """Runs the block.

    Args:
      x: [B, h, w, C]; skips: the matching down-path activations, consumed last first;
      temb: [B, T]; context: [B, S, D]; context_mask: [B, S] or None.

    Returns:
      [B, H, W, out_channels].
    """
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
      x = self.resnet(i)(x, temb)
      if self.num_attention_heads is not None:
        x = self.attention(i)(x, context, context_mask)
    if self.upsample_size is not None:
      x = layers.Upsample2D(self.out_channels, tuple(self.upsample_size),
                            lowering=self.lowering, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="upsamplers_0")(x)
    return x
