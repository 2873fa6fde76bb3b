"""Tests for the lowerings of fundax.models.lowering and fundax.models.attention.

Each lowering must compute the same function as the plain XLA op it replaces, forward and
backward, including the edge cases the UNet meets (key masks, blocks that split heads and
queries, 1x1 and stride-2 convolutions, a batch sharded over devices).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundax.models import attention
from fundax.models import lowering


def _qkv(batch=2, queries=16, keys=12, heads=4, dim=8, seed=0):
  keys_ = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys_[0], (batch, queries, heads, dim)),
          jax.random.normal(keys_[1], (batch, keys, heads, dim)),
          jax.random.normal(keys_[2], (batch, keys, heads, dim)))


def _grads(fn, q, k, v, weights):
  return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * weights), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("block_bytes", [64, 2048, 1 << 20], ids=["tiny", "split", "one"])
@pytest.mark.parametrize("masked", [False, True])
def test_flash_attention_equals_xla_attention_and_its_gradients(block_bytes, masked):
  q, k, v = _qkv()
  # Row 1's keys are all masked: it must attend uniformly, as jax.nn's attention does.
  mask = (jnp.arange(12)[None, :] < jnp.array([[7], [0]]))[:, None, None, :] if masked else None
  reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)
  flash = lambda q, k, v: attention.flash_attention(q, k, v, mask, block_bytes=block_bytes)
  np.testing.assert_allclose(jax.jit(flash)(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-5)
  weights = jax.random.normal(jax.random.key(9), q.shape)
  for got, want in zip(jax.jit(lambda *a: _grads(flash, *a, weights))(q, k, v),
                       _grads(reference, q, k, v, weights)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_flash_block_shapes_split_heads_then_queries():
  # [B=2, S=12] float32 rows are 96 bytes: 64 queries x 4 heads need 24 KiB.
  assert attention._block_shape(2, 4, 64, 12, 1 << 20) == (4, 64)  # one block
  assert attention._block_shape(2, 4, 64, 12, 12288) == (2, 64)  # two heads per block
  assert attention._block_shape(2, 4, 64, 12, 3072) == (1, 32)  # one head, half the queries
  assert attention._block_shape(2, 4, 63, 12, 64) == (1, 63)  # odd T is never split


def test_attention_impl_and_mask_shape_are_checked():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="unknown attention impl"):
    attention.dot_product_attention(q, k, v, impl="fast")
  with pytest.raises(ValueError, match="key masks only"):
    attention.flash_attention(q, k, v, jnp.ones((2, 1, 16, 12), bool))


def test_flash_attention_keeps_a_sharded_batch_sharded():
  devices = np.array(jax.devices())
  if len(devices) < 2:
    pytest.skip("needs several (simulated) devices")
  mesh = jax.sharding.Mesh(devices, ("data",))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  q, k, v = _qkv(batch=len(devices), queries=32, keys=32)
  fn = jax.jit(lambda q, k, v: jax.grad(lambda q: attention.flash_attention(
      q, k, v, block_bytes=2048).sum())(q), in_shardings=(batch,) * 3, out_shardings=batch)
  compiled = fn.lower(q, k, v).compile().as_text()
  assert "all-gather" not in compiled and "all-to-all" not in compiled
  want = jax.grad(lambda q: jax.nn.dot_product_attention(q, k, v).sum())(q)
  np.testing.assert_allclose(fn(q, k, v), want, rtol=1e-4, atol=1e-5)


def _conv_reference(x, w, stride=1, padding=None):
  k = w.shape[0]
  padding = padding or ((k // 2, k // 2),) * 2
  return jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("kernel,stride,padding", [
    (3, 1, None), (1, 1, None), (5, 1, None), (3, 2, ((1, 1), (1, 1))),
    (3, 2, ((0, 1), (0, 1)))], ids=["3x3", "1x1", "5x5", "stride2", "vae-pad"])
def test_matmul_convolution_equals_xla_convolution_and_its_gradients(kernel, stride, padding):
  keys = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(keys[0], (2, 9, 10, 6))
  w = 0.2 * jax.random.normal(keys[1], (kernel, kernel, 6, 5))
  pads = padding or ((kernel // 2, kernel // 2),) * 2
  conv = lowering.make_conv_fn(lowering.Lowering(conv="matmul"))
  lowered = lambda x, w: conv(x, w, (stride, stride), pads)
  reference = lambda x, w: _conv_reference(x, w, stride, pads)
  np.testing.assert_allclose(jax.jit(lowered)(x, w), reference(x, w), rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(keys[2], reference(x, w).shape)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) * cotangent)
  for got, want in zip(jax.jit(jax.grad(loss(lowered), (0, 1)))(x, w),
                       jax.grad(loss(reference), (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bfloat16_operands_round_only_the_products():
  keys = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(keys[0], (4, 7, 16))
  w = jax.random.normal(keys[1], (16, 8))
  g = jax.random.normal(keys[2], (4, 7, 8))
  bf16 = jnp.bfloat16
  out, vjp = jax.vjp(lambda x, w: lowering.mixed_matmul(x, w, bf16), x, w)
  assert out.dtype == jnp.float32
  # The forward and the input gradient are bfloat16 products accumulated in float32 ...
  round_ = lambda a: a.astype(bf16).astype(jnp.float32)
  np.testing.assert_allclose(out, round_(x) @ round_(w), rtol=1e-5, atol=1e-5)
  dx, dw = vjp(g)
  np.testing.assert_allclose(dx, round_(g) @ round_(w).T, rtol=1e-5, atol=1e-5)
  # ... the weight gradient a float32 product.
  np.testing.assert_allclose(dw, jnp.einsum("btk,btn->kn", x, g), rtol=1e-5, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(lambda x, w: lowering.mixed_matmul(x, w, bf16))(x, w))
  assert "bf16" in jaxpr and "preferred_element_type=float32" in jaxpr


def test_lowering_rejects_unknown_choices():
  for bad in (dict(conv="im2col"), dict(attention="fast"), dict(matmul_dtype="float16"),
              dict(attention_chunk=-1)):
    with pytest.raises(ValueError):
      lowering.Lowering(**bad)
