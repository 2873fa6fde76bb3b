"""A small PatchGAN discriminator for adversarial VAE training (pix2pix / taming style).

This module owns `PatchDiscriminator`: a stack of stride-2 4x4 convolutions that maps an
image to a grid of real/fake logits, each judging one receptive-field patch. It differs from
taming-transformers' NLayerDiscriminator in one way on purpose: GroupNorm instead of
BatchNorm, so the discriminator has no mutable batch statistics and its params are the only
state (a plain pytree, shardable like any other).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fundax.models.layers import Dtype


class PatchDiscriminator(nn.Module):
  """Image [B, H, W, C] in [-1, 1] -> patch logits [B, h, w, 1].

  Attributes:
    base_channels: channels of the first convolution; each later stride-2 layer doubles them
      (at most 8x).
    num_layers: stride-2 layers after the first convolution (taming's n_layers; 3 for 256 px).
    norm_groups: GroupNorm groups (clipped to the channel count).
    dtype: compute dtype; param_dtype: storage dtype.
  """
  base_channels: int = 64
  num_layers: int = 3
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = lambda y: nn.leaky_relu(y, 0.2)

    def conv(features, stride, bias, name):
      return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                     use_bias=bias, name=name, **kw)

    def norm(features, name):
      return nn.GroupNorm(min(self.norm_groups, features), name=name, **kw)

    x = act(conv(self.base_channels, 2, True, "conv_in")(x))
    for i in range(1, self.num_layers + 1):
      features = self.base_channels * min(2 ** i, 8)
      # The last layer keeps the resolution (stride 1), as in pix2pix.
      stride = 2 if i < self.num_layers else 1
      x = conv(features, stride, False, f"conv_{i}")(x)
      x = act(norm(features, f"norm_{i}")(x))
    return conv(1, 1, True, "conv_out")(x).astype(jnp.float32)
