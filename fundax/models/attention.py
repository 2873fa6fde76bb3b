"""Scaled dot-product attention, computed two ways with the same maths.

This module owns the attention kernel of the UNet and VAE (`dot_product_attention`):

  "xla"    `jax.nn.dot_product_attention`, optionally over chunks of queries
           (`query_chunk`, Rabe & Staats 2021) to bound the [B, heads, T, S] score memory at
           high resolution on TPU.
  "flash"  cache-blocked attention with its own backward pass (Dao et al. 2022's algorithm):
           a loop over blocks of heads and queries, each block's scores a few MiB, the forward
           keeping only the output and each row's max and log-sum, the backward recomputing
           each block's probabilities. XLA:CPU otherwise writes the whole score tensor to
           memory several times per pass: at the UNet benchmark's M size (1024 tokens, 8
           heads, batch 8) one self-attention's forward and backward took 1080 ms through
           "xla" and 185 ms this way (PyTorch's fused CPU kernel: 104 ms).

The batch axis is never sliced by the loops, so a batch sharded over a device mesh stays
sharded. "flash" (and "xla" over query chunks) takes a key mask only ([B, 1, 1, S]); a query
row whose keys are all masked attends uniformly, as `jax.nn.dot_product_attention` does.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

IMPLS = ("xla", "flash")
# Bytes of one block's float32 scores in "flash" (the batch is in every block): 8 MiB was the
# best of 0.5-32 MiB at both benchmark sizes on 2-core machines with 4 MiB of L2 per core:
# smaller blocks pay more per-iteration overhead, larger ones spill the caches.
FLASH_BLOCK_BYTES = 8 << 20
_F32 = jnp.float32


def _masked_value() -> float:
  """The score given to masked keys (jax.nn.dot_product_attention's choice for float32)."""
  return -0.7 * float(jnp.finfo(_F32).max)


def _scores(q, k, mask):
  """[g, B, t, S] float32 scores of query block q [g, B, t, h] against keys k [g, B, S, h]."""
  s = jnp.einsum("gbth,gbsh->gbts", q, k, preferred_element_type=_F32)
  return s if mask is None else jnp.where(mask, s, _masked_value())


def _forward_block(q, k, v, mask):
  """One block's output [g, B, t, h] and row statistics [g, B, t, 2]: max and log-sum."""
  s = _scores(q, k, mask)
  m = s.max(-1, keepdims=True)
  p = jnp.exp(s - m)
  total = p.sum(-1, keepdims=True)
  o = jnp.einsum("gbts,gbsh->gbth", p.astype(v.dtype), v, preferred_element_type=_F32) / total
  # Max and log-sum kept apart: a fully masked row's log-sum-exp m + log(S) rounds to m.
  return o.astype(q.dtype), jnp.concatenate([m, jnp.log(total)], axis=-1)


def _backward_block(q, k, v, mask, o, stats, do):
  """One block's dq [g, B, t, h] and its contributions dk^T, dv^T [g, B, h, S]."""
  p = jnp.exp(_scores(q, k, mask) - stats[..., :1] - stats[..., 1:])
  dp = jnp.einsum("gbth,gbsh->gbts", do, v, preferred_element_type=_F32)
  ds = p * (dp - jnp.sum(do.astype(_F32) * o.astype(_F32), -1, keepdims=True))
  if mask is not None:
    ds = jnp.where(mask, ds, 0.0)
  dq = jnp.einsum("gbts,gbsh->gbth", ds.astype(k.dtype), k, preferred_element_type=_F32)
  # dk = ds^T q and dv = p^T do contract the scores' query axis. XLA:CPU runs a dot that
  # contracts the big operand's leading axis ~3x slower, so compute the transposes
  # q^T ds and do^T p instead; the barriers stop XLA folding the small transposes back in.
  do_t, q_t = jax.lax.optimization_barrier((do.swapaxes(-1, -2), q.swapaxes(-1, -2)))
  dv_t = jnp.einsum("gbht,gbts->gbhs", do_t, p.astype(do.dtype), preferred_element_type=_F32)
  dk_t = jnp.einsum("gbht,gbts->gbhs", q_t, ds.astype(q.dtype), preferred_element_type=_F32)
  return (dq,) + jax.lax.optimization_barrier((dk_t, dv_t))


def _block_shape(batch: int, heads: int, queries: int, keys: int,
                 block_bytes: int) -> tuple[int, int]:
  """(heads per block, queries per block): one block's scores fit `block_bytes` if possible."""
  row = batch * keys * 4  # bytes of one query row's float32 scores over the batch
  t = queries
  while t * row > block_bytes and t % 2 == 0:
    t //= 2
  g = max(1, min(heads, block_bytes // (t * row)))
  while heads % g:
    g -= 1
  return g, t


def _blocks(x, g: int, t: int | None, i, num_t: int):
  """Block i of x [heads, B, T, ...] (heads in groups of g, queries in chunks of t)."""
  x = jax.lax.dynamic_slice_in_dim(x, (i // num_t) * g, g, 0)
  return x if t is None else jax.lax.dynamic_slice_in_dim(x, (i % num_t) * t, t, 2)


def _unblock(x, g: int, num_t: int):
  """Stacked blocks [n, g, B, t, ...] back to [heads, B, T, ...]."""
  n, _, b, t = x.shape[:4]
  x = x.reshape(n // num_t, num_t, g, b, t, *x.shape[4:]).swapaxes(1, 2).swapaxes(2, 3)
  return x.reshape(n // num_t * g, b, num_t * t, *x.shape[5:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, mask, g, t):
  """Blocked attention on head-major q [N, B, T, h], k, v [N, B, S, h]; mask [1, B, 1, S]."""
  return _flash_forward(q, k, v, mask, g, t)[0]


def _flash_forward(q, k, v, mask, g, t):
  num_t = q.shape[2] // t
  n = q.shape[0] // g * num_t

  def block(i):
    return _forward_block(_blocks(q, g, t, i, num_t), _blocks(k, g, None, i, num_t),
                          _blocks(v, g, None, i, num_t), mask)

  o, stats = jax.lax.map(block, jnp.arange(n))
  o, stats = _unblock(o, g, num_t), _unblock(stats, g, num_t)
  return o, (q, k, v, mask, o, stats)


def _flash_backward(g, t, residuals, do):
  q, k, v, mask, o, stats = residuals
  num_t = q.shape[2] // t

  def head_group(j):
    """dq of head group j, and its dk^T, dv^T summed over the query chunks."""
    key_part = lambda x: jax.lax.dynamic_slice_in_dim(x, j * g, g, 0)
    kj, vj = key_part(k), key_part(v)

    def query_chunk(acc, c):
      part = lambda x: jax.lax.dynamic_slice_in_dim(key_part(x), c * t, t, 2)
      dq, dk_t, dv_t = _backward_block(part(q), kj, vj, mask, part(o), part(stats), part(do))
      return (acc[0] + dk_t, acc[1] + dv_t), dq

    zeros = jnp.zeros(kj.shape[:2] + (kj.shape[3], kj.shape[2]), _F32)
    (dk_t, dv_t), dq = jax.lax.scan(query_chunk, (zeros, zeros), jnp.arange(num_t))
    return dq, dk_t, dv_t  # dq [num_t, g, B, t, h]

  dq, dk_t, dv_t = jax.lax.map(head_group, jnp.arange(q.shape[0] // g))
  dq = dq.reshape(-1, *dq.shape[2:])  # [n, g, B, t, h] in block order
  # Key gradients back to [N, B, S, h].
  unstack = lambda x: x.reshape(k.shape[0], k.shape[1], k.shape[3], k.shape[2]).swapaxes(-1, -2)
  return (_unblock(dq, g, num_t).astype(q.dtype), unstack(dk_t).astype(k.dtype),
          unstack(dv_t).astype(v.dtype), None)


_flash.defvjp(_flash_forward, _flash_backward)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                    *, block_bytes: int = FLASH_BLOCK_BYTES) -> jax.Array:
  """Cache-blocked attention with a recomputing backward pass (see the module docstring).

  Args:
    q: [B, T, heads, dim]; k, v: [B, S, heads, dim].
    mask: None or a bool key mask broadcastable to [B, 1, 1, S].
    block_bytes: target size of one block's float32 scores.

  Returns:
    [B, T, heads, dim], equal to `jax.nn.dot_product_attention` up to float rounding.
  """
  b, t, heads, dim = q.shape
  if mask is not None:
    if mask.shape[-2] != 1 or mask.shape[1] != 1:
      raise ValueError("flash attention takes key masks only ([B, 1, 1, S])")
    mask = jnp.broadcast_to(mask, (b, 1, 1, k.shape[1])).reshape(1, b, 1, k.shape[1])
  head_major = lambda x: x.transpose(2, 0, 1, 3)  # [heads, B, tokens, dim]
  q = q * jnp.asarray(1.0 / math.sqrt(dim), q.dtype)
  g, chunk = _block_shape(b, heads, t, k.shape[1], block_bytes)
  o = _flash(head_major(q), head_major(k), head_major(v), mask, g, chunk)
  return o.transpose(1, 2, 0, 3)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None, *, impl: str = "xla",
                          query_chunk: int = 0) -> jax.Array:
  """Scaled dot-product attention by `impl` (see IMPLS).

  Args:
    q: [B, T, heads, dim] queries; k, v: [B, S, heads, dim].
    mask: None or bool broadcastable to [B, heads, T, S] ("flash": [B, 1, 1, S] only).
    impl: "xla" or "flash".
    query_chunk: "xla" only: queries per chunk (dividing T), each chunk's scores
      rematerialised in the backward pass so one chunk's exist at a time; 0 or >= T attends
      in one piece.

  Returns:
    [B, T, heads, dim].
  """
  if impl == "flash":
    return flash_attention(q, k, v, mask)
  if impl != "xla":
    raise ValueError(f"unknown attention impl {impl!r}; known: {IMPLS}")
  t = q.shape[1]
  if not query_chunk or query_chunk >= t:
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
  if t % query_chunk:
    raise ValueError(f"attention query_chunk {query_chunk} must divide the {t} queries")
  if mask is not None and mask.shape[-2] != 1:
    raise ValueError("query-chunked attention takes key masks only ([B, 1, 1, S])")
  chunks = q.reshape(q.shape[0], t // query_chunk, query_chunk, *q.shape[2:]).swapaxes(0, 1)
  attend = jax.checkpoint(lambda qc: jax.nn.dot_product_attention(qc, k, v, mask=mask))
  out = jax.lax.map(attend, chunks)  # [T / chunk, B, chunk, heads, dim]
  return out.swapaxes(0, 1).reshape(q.shape[:2] + out.shape[3:])
