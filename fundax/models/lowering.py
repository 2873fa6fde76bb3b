"""How the models' dense layers, convolutions and attention are computed.

A `Lowering` changes the XLA program, never the parameters or the maths (results agree to
float rounding, or to bfloat16 rounding with `matmul_dtype="bfloat16"`). The defaults are
the plain XLA ops, the right choice on TPU and GPU; the other choices exist for XLA:CPU,
measured against PyTorch in `bench/unet_bench.py` (what each did is in bench/README.md):

  conv="matmul"           a k x k stride-1 convolution as k matrix products over rows of
                          the input with its k horizontal taps side by side (a 1x1 one as
                          one product), with its own backward pass. XLA:CPU's native
                          weight-gradient convolutions ran at 40-65 GFLOP/s where its
                          matrix products run at 200-300.
  attention="flash"       see fundax.models.attention.
  matmul_dtype="bfloat16" dense and convolution operands rounded to bfloat16, products
                          accumulated and returned in float32, everything else float32:
                          mixed-precision training as TPUs do it. On CPUs with AMX or
                          AVX512-BF16 units XLA:CPU runs such a product 4-5x faster than a
                          float32 one; on CPUs without them it is slower.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fundax.models import attention as attention_lib

CONV_IMPLS = ("native", "matmul")
MATMUL_DTYPES = ("", "bfloat16")  # "": operands in the module's compute dtype
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Lowering:
  """How contractions are computed (see the module docstring).

  Attributes:
    conv: "native" or "matmul".
    attention: "xla" or "flash" (fundax.models.attention.IMPLS).
    attention_chunk: queries per chunk for attention="xla" (0: all at once).
    matmul_dtype: "" or "bfloat16".
  """
  conv: str = "native"
  attention: str = "xla"
  attention_chunk: int = 0
  matmul_dtype: str = ""

  def __post_init__(self):
    if self.conv not in CONV_IMPLS:
      raise ValueError(f"unknown conv_impl {self.conv!r}; known: {CONV_IMPLS}")
    if self.attention not in attention_lib.IMPLS:
      raise ValueError(f"unknown attention_impl {self.attention!r}; known: "
                       f"{attention_lib.IMPLS}")
    if self.matmul_dtype not in MATMUL_DTYPES:
      raise ValueError(f"unknown matmul_dtype {self.matmul_dtype!r}; known: {MATMUL_DTYPES}")
    if self.attention_chunk < 0:
      raise ValueError(f"attention_chunk must be >= 0, got {self.attention_chunk}")

  @property
  def operand_dtype(self) -> Any:
    return jnp.dtype(self.matmul_dtype) if self.matmul_dtype else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_matmul(x: jax.Array, w: jax.Array, operand_dtype: Any) -> jax.Array:
  """x [..., K] @ w [K, N] with operands in `operand_dtype`, accumulated and returned in float32.

  The backward pass keeps the same rule for the input gradient (cotangent and weights rounded
  to `operand_dtype`); the weight gradient is a float32 product (measured faster on XLA:CPU,
  whose bfloat16 fast path needs the contraction on the operands' last axis).
  """
  return jnp.dot(x.astype(operand_dtype), w.astype(operand_dtype), preferred_element_type=_F32)


def _mixed_forward(x, w, operand_dtype):
  return mixed_matmul(x, w, operand_dtype), (x, w)


def _mixed_backward(operand_dtype, residuals, g):
  x, w = residuals
  dx = jnp.dot(g.astype(operand_dtype), w.astype(operand_dtype).T, preferred_element_type=_F32)
  dw = jnp.dot(x.reshape(-1, x.shape[-1]).astype(_F32).T, g.reshape(-1, g.shape[-1]).astype(_F32))
  return dx.astype(x.dtype), dw.astype(w.dtype)


mixed_matmul.defvjp(_mixed_forward, _mixed_backward)


def _row_taps(x: jax.Array, k: int, width: int, operand_dtype: Any) -> jax.Array:
  """x [B, H, W, C] padded by k // 2, its k horizontal taps side by side: [B, H+k-1, W, kC]."""
  p = k // 2
  xp = jnp.pad(x.astype(operand_dtype), ((0, 0), (p, p), (p, p), (0, 0)))
  return xp if k == 1 else jnp.concatenate([xp[:, :, j:j + width] for j in range(k)], axis=-1)


def _rows_conv(x: jax.Array, w: jax.Array, operand_dtype: Any) -> jax.Array:
  """Stride-1 'same' convolution as k products: sum_i taps[:, i:i+H] @ w[i] -> float32."""
  k, height, width = w.shape[0], x.shape[1], x.shape[2]
  taps = _row_taps(x, k, width, operand_dtype)
  rows = w.astype(operand_dtype).reshape(k, k * w.shape[2], w.shape[3])
  out = None
  for i in range(k):
    y = jnp.dot(taps[:, i:i + height], rows[i], preferred_element_type=_F32)
    out = y if out is None else out + y
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rows_conv(x: jax.Array, w: jax.Array, operand_dtype: Any) -> jax.Array:
  """A stride-1, odd-kernel, 'same'-padded NHWC convolution by row-tap matrix products.

  Args:
    x: [B, H, W, C]; w: [k, k, C, O] (HWIO).
    operand_dtype: dtype of the products' operands (accumulation is float32).

  Returns:
    [B, H, W, O] float32.
  """
  return _rows_conv(x, w, operand_dtype)


def _rows_forward(x, w, operand_dtype):
  return _rows_conv(x, w, operand_dtype), (x, w)


def _rows_backward(operand_dtype, residuals, dy):
  x, w = residuals
  k, height = w.shape[0], dy.shape[1]
  # The input gradient is the same convolution of dy with the flipped, transposed kernel.
  dx = _rows_conv(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3), operand_dtype)
  # Weight gradient of kernel row i: the input's row taps at offset i against dy.
  taps = _row_taps(x, k, x.shape[2], operand_dtype)
  dy_flat = dy.reshape(-1, dy.shape[-1]).astype(operand_dtype)
  dw = jnp.stack([jnp.dot(taps[:, i:i + height].reshape(-1, taps.shape[-1]).T, dy_flat,
                          preferred_element_type=_F32) for i in range(k)])
  return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


rows_conv.defvjp(_rows_forward, _rows_backward)


def _padding_pairs(padding) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    if padding != "VALID":
      raise ValueError(f"convolutions here take explicit padding, got {padding!r}")
    return ((0, 0), (0, 0))
  return tuple(tuple(int(v) for v in p) for p in padding)


def default_for_backend(backend: str | None = None) -> dict[str, str]:
  """UNetConfig lowering fields for models rebuilt from a checkpoint on `backend`.

  On CPU the cache-blocked attention (faster on any CPU, same maths); elsewhere XLA's own
  ops. The matmul convolutions and bfloat16 operands pay off only on CPUs with bfloat16
  matrix units, so they stay opt-in.

  Args:
    backend: a JAX platform name; None: `jax.default_backend()`.
  """
  backend = backend or jax.default_backend()
  return {"attention_impl": "flash"} if backend == "cpu" else {}


def make_conv_fn(lowering: Lowering):
  """A `conv_general_dilated` for `nn.Conv` (NHWC / HWIO) computed as `lowering` says.

  "matmul" covers stride-1 convolutions with odd square kernels and symmetric 'same'
  padding (every UNet convolution but the stride-2 downsamplers); anything else, and
  conv="native", is XLA's convolution (with `matmul_dtype` operands).
  """
  operand_dtype = lowering.operand_dtype

  def conv(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, precision=None, **unused):
    del unused
    pads = _padding_pairs(padding)
    dimension_numbers = dimension_numbers or ("NHWC", "HWIO", "NHWC")
    k = rhs.shape[0]
    plain = (not any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
             and feature_group_count == 1)
    same = (rhs.shape[0] == rhs.shape[1] and k % 2 == 1 and pads == ((k // 2, k // 2),) * 2
            and tuple(window_strides) == (1, 1))
    if lowering.conv == "matmul" and plain and same:
      if k == 1:
        return dense_product(lhs, rhs[0, 0], operand_dtype)
      return rows_conv(lhs, rhs, operand_dtype or lhs.dtype).astype(
          _F32 if operand_dtype else lhs.dtype)
    if operand_dtype is not None:
      lhs, rhs = lhs.astype(operand_dtype), rhs.astype(operand_dtype)
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, pads, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, precision=precision,
        preferred_element_type=None if operand_dtype is None else _F32)

  return conv


def dense_product(x: jax.Array, w: jax.Array, operand_dtype: Any) -> jax.Array:
  """x [..., K] @ w [K, N]: plain in x's dtype, or `mixed_matmul` with `operand_dtype`."""
  if operand_dtype is None:
    return jnp.dot(x, w)
  return mixed_matmul(x, w, operand_dtype)


def make_dot_general(lowering: Lowering):
  """A `dot_general` for `nn.Dense` (contracting the input's last axis) per `lowering`."""
  operand_dtype = lowering.operand_dtype
  if operand_dtype is None:
    return None  # Flax's own jax.lax.dot_general

  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    del precision, preferred_element_type
    (contract_l, contract_r), (batch_l, batch_r) = dimension_numbers
    if (tuple(contract_l) != (lhs.ndim - 1,) or tuple(contract_r) != (0,) or batch_l
        or batch_r or rhs.ndim != 2):
      raise ValueError(f"matmul_dtype dense layers contract the last axis; got "
                       f"{dimension_numbers}")
    return mixed_matmul(lhs, rhs, operand_dtype)

  return dot_general


def conv2d(features: int, kernel: int, dtype: Any, param_dtype: Any, name: str,
           lowering: Lowering = Lowering(), stride: int = 1, padding: Any = None) -> nn.Conv:
  """A square conv with torch's symmetric "same" padding unless `padding` is given."""
  if padding is None:
    padding = (((kernel - 1) // 2,) * 2,) * 2
  native = lowering.conv == "native" and lowering.operand_dtype is None
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=param_dtype, name=name,
                 conv_general_dilated=None if native else make_conv_fn(lowering))


def dense(features: int, dtype: Any, param_dtype: Any, name: str,
          lowering: Lowering = Lowering(), use_bias: bool = True) -> nn.Dense:
  """`nn.Dense` whose product follows `lowering.matmul_dtype`."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  dot_general=make_dot_general(lowering))
