"""Prompt embeddings for the Selector: frozen text encoder, mean-pooled token states.

The Selector conditions on one vector per prompt: the attention-masked mean of the text
encoder's token states (the sentence embedding all-MiniLM-L6-v2 was trained to give). The
encoder is frozen, so prompts are embedded once on the host before training (unique prompts
only) and again at scoring time from the same spec, stored in the checkpoint config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fundax.data import tokenizer as tokenizer_lib
from fundax.models import text_encoder as text_encoder_lib

log = logging.getLogger(__name__)

NO_TEXT = "none"  # text encoder spec meaning: the Selector is not conditioned on prompts


def make_prompt_embedder(spec: str, max_length: int, batch_size: int = 64
                         ) -> tuple[Callable[[list[str]], np.ndarray] | None, int | None]:
  """A host function mapping prompts to pooled embeddings, and the embedding width.

  Args:
    spec: a `load_text_encoder` spec ("minilm", "random", a directory, a hub id named by the
      user), or "none" for no text conditioning.
    max_length: token sequence length (longer prompts are truncated).
    batch_size: prompts per encoder call (the last call is padded, so one compilation).

  Returns:
    `(embed, dim)`: `embed(prompts) -> float32 [K, dim]`; `(None, None)` for "none".
  """
  if spec == NO_TEXT:
    return None, None
  encoder, params, vocab = text_encoder_lib.load_text_encoder(spec)
  if isinstance(vocab, dict):  # a fundax params directory stores a tokenizer reference
    tokenizer = tokenizer_lib.make_tokenizer_from_reference(vocab)
  else:
    tokenizer = tokenizer_lib.make_tokenizer(vocab)

  @jax.jit
  def pooled(ids, mask):
    states = encoder.apply({"params": params}, ids, mask)  # [B, L, D]
    m = mask[..., None].astype(states.dtype)
    return (states * m).sum(1) / jnp.maximum(m.sum(1), 1.0)

  def embed(prompts: list[str]) -> np.ndarray:
    out = []
    for start in range(0, len(prompts), batch_size):
      chunk = list(prompts[start:start + batch_size])
      n = len(chunk)
      tokens = tokenizer_lib.tokenize(tokenizer, chunk + [""] * (batch_size - n), max_length)
      out.append(np.asarray(pooled(tokens["input_ids"], tokens["attention_mask"]))[:n])
    log.info("embedded %d prompts with text encoder %r", len(prompts), spec)
    return np.concatenate(out).astype(np.float32)

  return embed, encoder.output_dim
