"""BERT encoder in Flax linen, numerically matching Hugging Face's PyTorch `BertModel`.

This module owns the architecture and its config: `BertConfig` (built from and written back to
a Hugging Face config.json dict) and `BertModel`, which maps token ids to the last hidden state
`[B, L, H]`. Weight conversion lives in `fundax.interop.hf_bert`; the conditioning wrapper used
by the diffusion model lives in `fundax.models.text_encoder`. The pooler and pre-training
heads are not part of the model: the diffusion model conditions on token states.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

_MASK_BIAS = -1e30

# Hugging Face `hidden_act` names -> JAX functions. "gelu" is the exact erf form; the tanh
# approximations all compute the same formula.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_python": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT encoder; field names and defaults follow Hugging Face's."""
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pad_token_id: int = 0

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size ({self.hidden_size}) is not a multiple of "
                       f"num_attention_heads ({self.num_attention_heads})")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; "
                       f"supported: {sorted(ACTIVATIONS)}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "BertConfig":
    """Builds a config from a Hugging Face config.json dict.

    Keys that do not change the encoder's forward pass (architectures, torch_dtype, ...) are
    ignored; settings this implementation does not support raise.

    Args:
      hf: the parsed config.json.

    Returns:
      The config.

    Raises:
      ValueError: a non-BERT model type, relative position embeddings, a decoder config, or a
        required key missing.
    """
    model_type = hf.get("model_type", "bert")
    if model_type != "bert":
      raise ValueError(f"model_type {model_type!r} is not supported; only 'bert' checkpoints "
                       "(BERT, BiomedBERT, MiniLM, ...) are")
    position_type = hf.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise ValueError(f"position_embedding_type {position_type!r} is not supported; "
                       "only 'absolute' is")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
      raise ValueError("decoder BERT configs (is_decoder / add_cross_attention) are not supported")
    fields = {f.name for f in dataclasses.fields(cls)}
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    missing = [k for k in required if k not in hf]
    if missing:
      raise ValueError(f"BERT config.json is missing required keys {missing}")
    return cls(**{k: v for k, v in hf.items() if k in fields})

  def to_hf(self) -> dict[str, Any]:
    """Returns a Hugging Face config.json dict that `transformers.BertModel` loads."""
    return {"architectures": ["BertModel"], "model_type": "bert",
            "position_embedding_type": "absolute", **dataclasses.asdict(self)}


class BertEmbeddings(nn.Module):
  """Word + absolute position + token type embeddings, then LayerNorm and dropout."""
  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool):
    cfg = self.config
    init = nn.initializers.normal(stddev=cfg.initializer_range)
    embed = functools.partial(nn.Embed, features=cfg.hidden_size, dtype=self.dtype,
                              param_dtype=self.param_dtype, embedding_init=init)
    x = (embed(cfg.vocab_size, name="word_embeddings")(input_ids)
         + embed(cfg.max_position_embeddings, name="position_embeddings")(position_ids)
         + embed(cfg.type_vocab_size, name="token_type_embeddings")(token_type_ids))
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="layer_norm")(x)
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  """Multi-head self-attention with an additive key-padding bias."""
  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bias, deterministic: bool):
    cfg = self.config
    dense = functools.partial(
        nn.Dense, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.normal(stddev=cfg.initializer_range))
    split = lambda t: t.reshape(t.shape[:-1] + (cfg.num_attention_heads, cfg.head_dim))
    q = split(dense(name="query")(x))  # [B, L, h, d]
    k = split(dense(name="key")(x))
    v = split(dense(name="value")(x))
    # Logits and softmax in float32 so bf16 compute cannot overflow or lose the mask.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    logits = logits * (cfg.head_dim ** -0.5) + bias  # [B, h, L, L]
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape[:-1] + (cfg.hidden_size,))
    return dense(name="out")(out)


class BertLayer(nn.Module):
  """One post-LayerNorm transformer block: attention, then the GELU feed-forward."""
  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bias, deterministic: bool):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    kernel_init = nn.initializers.normal(stddev=cfg.initializer_range)
    dropout = nn.Dropout(cfg.hidden_dropout_prob)
    h = BertSelfAttention(cfg, name="attention", **kw)(x, bias, deterministic)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="attention_norm", **kw)(
        x + dropout(h, deterministic=deterministic))
    h = nn.Dense(cfg.intermediate_size, kernel_init=kernel_init, name="intermediate", **kw)(x)
    h = ACTIVATIONS[cfg.hidden_act](h)
    h = nn.Dense(cfg.hidden_size, kernel_init=kernel_init, name="output", **kw)(h)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="output_norm", **kw)(
        x + dropout(h, deterministic=deterministic))


class BertModel(nn.Module):
  """BERT encoder: token ids -> last hidden state.

  Attributes:
    config: the architecture.
    dtype: compute dtype (attention softmax is always float32).
    param_dtype: parameter storage dtype.
  """
  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
               deterministic: bool = True):
    """Encodes a batch of token ids.

    Args:
      input_ids: int `[B, L]` token ids, `L <= config.max_position_embeddings`.
      attention_mask: `[B, L]`, 1 (or True) for real tokens and 0 for padding; padded keys
        get a large negative attention bias, as in transformers. None attends everywhere.
      token_type_ids: int `[B, L]` segment ids; zeros when None.
      position_ids: int `[B, L]` or `[L]` absolute positions; `arange(L)` when None.
      deterministic: disables dropout; pass False (with a "dropout" rng) to train.

    Returns:
      The last hidden state `[B, L, hidden_size]` in `dtype`. Rows at padded positions are
      computed but meaningless.

    Raises:
      ValueError: on inputs of the wrong rank or shape (checked at trace time).
    """
    cfg = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    batch, length = input_ids.shape
    if length > cfg.max_position_embeddings:
      raise ValueError(f"input_ids length {length} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    for name, arr in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
      if arr is not None and arr.shape != input_ids.shape:
        raise ValueError(f"{name} shape {arr.shape} does not match input_ids shape "
                         f"{input_ids.shape}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = jnp.arange(length)
    position_ids = jnp.broadcast_to(position_ids, (batch, length))
    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), jnp.bool_)
    # Additive key bias [B, 1, 1, L]. Large but finite (unlike finfo.min plus a negative
    # logit, which rounds to -inf) so an all-padding row gives uniform weights, not NaN.
    bias = jnp.where(attention_mask.astype(jnp.bool_), 0.0, _MASK_BIAS)[:, None, None, :]

    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = BertEmbeddings(cfg, name="embeddings", **kw)(input_ids, token_type_ids, position_ids,
                                                     deterministic)
    for i in range(cfg.num_hidden_layers):
      x = BertLayer(cfg, name=f"layer_{i}", **kw)(x, bias, deterministic)
    return x
