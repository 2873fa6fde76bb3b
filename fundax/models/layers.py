"""Building blocks shared by the VAE and the UNet, mirroring diffusers' PyTorch layers.

This module owns the layers whose parameter names and numerics must match diffusers exactly so
that `fundax.interop.diffusers` can move weights across with a mechanical key mapping:
GroupNorm with diffusers' eps and group counts, `ResnetBlock2D`, `Downsample2D`, `Upsample2D`,
the multi-head `Attention` (used as plain attention in transformer blocks and as the
group-normed residual spatial attention of the VAE), the GEGLU `FeedForward`,
`BasicTransformerBlock` / `Transformer2DModel`, and the sinusoidal timestep embedding.

Everything is NHWC. Submodule names follow diffusers' attribute names, with list entries
written `name_<index>` (e.g. `to_out_0`, `resnets_1`), so `a.b.0.c` in a PyTorch state dict is
`a/b_0/c` here. `dtype` is the compute dtype, `param_dtype` the storage dtype, and
`lowering` (fundax.models.lowering) how convolutions, dense layers and attention are computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fundax.models import attention as attention_lib
from fundax.models import lowering as lowering_lib

Dtype = Any
Lowering = lowering_lib.Lowering


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, torch's default, as x * (1 + erf(x / sqrt 2)) / 2.

  The same function as `nn.gelu(x, approximate=False)`, which XLA lowers through erfc at
  about 1.5x the cost on CPU (measured on a [8, 1024, 1024] tensor).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": gelu,
    "relu": nn.relu,
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the activation diffusers calls `name` (`act_fn` in its configs).

  Args:
    name: one of "silu", "swish", "gelu", "relu", "mish".

  Returns:
    The elementwise function.
  """
  try:
    return _ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unsupported activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


def group_norm(num_groups: int, eps: float, dtype: Dtype, param_dtype: Dtype,
               name: str) -> nn.GroupNorm:
  """A GroupNorm over the channel (last) axis, statistics over all other non-batch axes.

  That is torch.nn.GroupNorm's definition for both [B, H, W, C] and [B, T, C] inputs. Two-pass
  variance: the one-pass E[x^2] - E[x]^2 form loses digits on large activations and breaks
  parity with diffusers at 1e-4.
  """
  return nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                      use_fast_variance=False, name=name)


# A square conv with torch's symmetric "same" padding, computed as its `lowering` says.
conv2d = lowering_lib.conv2d


class ResnetBlock2D(nn.Module):
  """diffusers' ResnetBlock2D: norm-act-conv twice, time embedding added in between.

  Attributes:
    out_channels: output channels; a 1x1 `conv_shortcut` is added when they differ from the
      input's, as in diffusers.
    groups: GroupNorm groups (both norms).
    eps: GroupNorm epsilon.
    act_fn: activation name.
    output_scale_factor: the residual sum is divided by this.
  """
  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  act_fn: str = "silu"
  output_scale_factor: float = 1.0
  lowering: Lowering = Lowering()  # how convolutions and dense layers are computed
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    """Args: x [B, H, W, Cin]; temb [B, T] or None (the VAE). Returns [B, H, W, out_channels]."""
    act = get_activation(self.act_fn)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = act(group_norm(self.groups, self.eps, name="norm1", **kw)(x))
    conv_kw = dict(lowering=self.lowering, **kw)
    h = conv2d(self.out_channels, 3, name="conv1", **conv_kw)(h)
    if temb is not None:
      # diffusers' time_embedding_norm="default": add the projected embedding before norm2.
      proj = lowering_lib.dense(self.out_channels, name="time_emb_proj", **conv_kw)
      h = h + proj(act(temb))[:, None, None]
    h = group_norm(self.groups, self.eps, name="norm2", **kw)(h)
    h = conv2d(self.out_channels, 3, name="conv2", **conv_kw)(act(h))
    if x.shape[-1] != self.out_channels:
      x = conv2d(self.out_channels, 1, name="conv_shortcut", **conv_kw)(x)
    return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv. `padding=0` reproduces diffusers' (0, 1, 0, 1) pad (the VAE's)."""
  out_channels: int
  padding: int = 1
  lowering: Lowering = Lowering()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, H, W, C]. Returns [B, ceil(H / 2), ceil(W / 2), out_channels]."""
    # diffusers pads right/bottom by one when padding == 0 (F.pad (0, 1, 0, 1) on NCHW).
    pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding,) * 2,) * 2
    return conv2d(self.out_channels, 3, self.dtype, self.param_dtype, "conv", stride=2,
                  padding=pad, lowering=self.lowering)(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
  """Nearest-neighbour resize to `size` (default 2x), indexing as torch's F.interpolate.

  Args:
    x: [B, H, W, C].
    size: target (H', W'); None means (2H, 2W).

  Returns:
    [B, H', W', C].
  """
  b, h, w, c = x.shape
  if size is None or tuple(size) == (2 * h, 2 * w):
    # Broadcast + reshape instead of a gather: one fused copy.
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)
  # torch "nearest": src = floor(dst * in / out).
  rows = jnp.floor(jnp.arange(size[0]) * (h / size[0])).astype(jnp.int32)
  cols = jnp.floor(jnp.arange(size[1]) * (w / size[1])).astype(jnp.int32)
  return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
  """Nearest-neighbour upsampling (2x or to `output_size`) followed by a 3x3 conv."""
  out_channels: int
  output_size: tuple[int, int] | None = None
  lowering: Lowering = Lowering()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, H, W, C]. Returns [B, 2H, 2W, out_channels] (or `output_size`)."""
    x = upsample_nearest(x, self.output_size)
    return conv2d(self.out_channels, 3, self.dtype, self.param_dtype, "conv",
                  lowering=self.lowering)(x)


class Attention(nn.Module):
  """diffusers' `Attention` (default processor): q/k/v projections, SDPA, output projection.

  With `norm_num_groups` and `residual_connection` it is the VAE's spatial self-attention:
  4-D inputs are flattened to tokens, group-normed, attended and added back to the input.

  Attributes:
    heads: number of heads.
    dim_head: channels per head.
    bias: whether to_q/to_k/to_v have biases (to_out_0 always has one).
    norm_num_groups: if set, a `group_norm` is applied to the input first.
    eps: that GroupNorm's epsilon.
    residual_connection: add the input to the output.
    rescale_output_factor: divide the output by this.
    lowering: how the projections and the attention itself are computed.
  """
  heads: int
  dim_head: int
  bias: bool = False
  norm_num_groups: int | None = None
  eps: float = 1e-5
  residual_connection: bool = False
  rescale_output_factor: float = 1.0
  lowering: Lowering = Lowering()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """Attends from `x` to `context` (default: `x` itself).

    Args:
      x: [B, T, C] tokens or [B, H, W, C] feature map.
      context: [B, S, Cc] keys/values source, or None for self-attention.
      mask: [B, S] bool, True where a context token may be attended to.

    Returns:
      Same shape as `x`.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    residual = x
    shape = x.shape
    h = x.reshape(shape[0], -1, shape[-1])  # [B, T, C]
    if self.norm_num_groups is not None:
      h = group_norm(self.norm_num_groups, self.eps, name="group_norm", **kw)(h)
    context = h if context is None else context
    inner = self.heads * self.dim_head
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)
    dense = lambda n, name, bias=True: lowering_lib.dense(n, name=name, lowering=self.lowering,
                                                          use_bias=bias, **kw)
    q = split(dense(inner, "to_q", self.bias)(h))
    k = split(dense(inner, "to_k", self.bias)(context))
    v = split(dense(inner, "to_v", self.bias)(context))
    if mask is not None:
      mask = mask[:, None, None, :].astype(bool)  # [B, 1, 1, S]
    o = attention_lib.dot_product_attention(  # [B, T, heads, dim_head]
        q, k, v, mask, impl=self.lowering.attention, query_chunk=self.lowering.attention_chunk)
    o = o.reshape(o.shape[0], o.shape[1], inner)
    o = dense(shape[-1], "to_out_0")(o).reshape(shape)
    if self.residual_connection:
      o = o + residual
    return o / self.rescale_output_factor


class GEGLU(nn.Module):
  """diffusers' GEGLU: one projection to 2 x `inner`, the second half gates the first."""
  inner: int
  lowering: Lowering = Lowering()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, T, C]. Returns [B, T, inner]."""
    h = lowering_lib.dense(2 * self.inner, self.dtype, self.param_dtype, "proj",
                           self.lowering)(x)
    hidden, gate = jnp.split(h, 2, axis=-1)
    return hidden * gelu(gate)


class FeedForward(nn.Module):
  """diffusers' FeedForward with GEGLU: `net_0` (GEGLU), dropout (net.1, none here), `net_2`."""
  mult: int = 4
  lowering: Lowering = Lowering()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, T, C]. Returns [B, T, C]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lowering=self.lowering)
    h = GEGLU(self.mult * x.shape[-1], name="net_0", **kw)(x)
    return lowering_lib.dense(x.shape[-1], name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual."""
  heads: int
  dim_head: int
  lowering: Lowering = Lowering()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array,
               context_mask: jax.Array | None = None) -> jax.Array:
    """Args: x [B, T, C]; context [B, S, D]; context_mask [B, S] or None. Returns [B, T, C]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name, **kw)
    attn = lambda name: Attention(self.heads, self.dim_head, name=name, lowering=self.lowering,
                                  **kw)
    x = attn("attn1")(ln("norm1")(x)) + x
    x = attn("attn2")(ln("norm2")(x), context, context_mask) + x
    return FeedForward(name="ff", lowering=self.lowering, **kw)(ln("norm3")(x)) + x


class Transformer2DModel(nn.Module):
  """diffusers' Transformer2DModel on continuous inputs (the UNet's cross-attention block).

  Attributes:
    heads: attention heads; `dim_head` channels each (inner dim = heads * dim_head).
    num_layers: number of BasicTransformerBlocks.
    norm_num_groups: groups of the input GroupNorm (eps 1e-6 as diffusers).
    use_linear_projection: proj_in/proj_out as Dense (SD 2.x) instead of 1x1 convs (SD 1.x).
  """
  heads: int
  dim_head: int
  num_layers: int = 1
  norm_num_groups: int = 32
  use_linear_projection: bool = False
  lowering: Lowering = Lowering()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array,
               context_mask: jax.Array | None = None) -> jax.Array:
    """Args: x [B, H, W, C]; context [B, S, D]; context_mask [B, S]. Returns [B, H, W, C]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hgt, wid, c = x.shape
    inner = self.heads * self.dim_head
    h = group_norm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
    kw["lowering"] = self.lowering
    if self.use_linear_projection:
      h = lowering_lib.dense(inner, name="proj_in", **kw)(h.reshape(b, hgt * wid, c))
    else:
      h = conv2d(inner, 1, name="proj_in", **kw)(h)
      h = h.reshape(b, hgt * wid, inner)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(self.heads, self.dim_head, name=f"transformer_blocks_{i}",
                                **kw)(h, context, context_mask)
    if self.use_linear_projection:
      h = lowering_lib.dense(c, name="proj_out", **kw)(h).reshape(b, hgt, wid, c)
    else:
      h = conv2d(c, 1, name="proj_out", **kw)(h.reshape(b, hgt, wid, inner))
    return h + x


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
  """diffusers' `get_timestep_embedding`: sinusoids of geometrically spaced frequencies.

  Args:
    timesteps: [B] (float or int) timesteps.
    dim: embedding width.
    flip_sin_to_cos: put the cosines first (SD's setting).
    freq_shift: diffusers' `downscale_freq_shift`.
    max_period: the lowest frequency's period.

  Returns:
    [B, dim] float32 embedding.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """diffusers' TimestepEmbedding: linear_1, activation, linear_2."""
  time_embed_dim: int
  act_fn: str = "silu"
  lowering: Lowering = Lowering()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, Din]. Returns [B, time_embed_dim]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lowering=self.lowering)
    x = lowering_lib.dense(self.time_embed_dim, name="linear_1", **kw)(x)
    return lowering_lib.dense(self.time_embed_dim, name="linear_2", **kw)(
        get_activation(self.act_fn)(x))
