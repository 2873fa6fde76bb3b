"""Hugging Face BERT checkpoints <-> fundax `BertModel` params.

This module owns the weight-name mapping between the Hugging Face layout (config.json plus
model.safetensors, a sharded safetensors index, or pytorch_model.bin) and the Flax parameter
tree of `fundax.models.bert.BertModel`, including the `[out, in]` -> `[in, out]` transposes of
linear weights. Any BERT-family checkpoint works: a bare `BertModel` (MiniLM), or a
pre-training / masked-LM model whose encoder sits under "bert." (BiomedBERT); heads such as
the pooler and "cls." are skipped with a log line.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from fundax.interop import params_io
from fundax.models.bert import BertConfig, BertModel

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
_PREFIX = "bert."
# Non-persistent buffers that older transformers versions wrote into checkpoints.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
# Leaf conversions: HF leaf name -> Flax leaf name, per module kind.
_LEAVES = {
    "dense": {"weight": "kernel", "bias": "bias"},
    "embed": {"weight": "embedding"},
    "norm": {"weight": "scale", "bias": "bias"},
}


def _module_map(config: BertConfig) -> dict[str, tuple[str, str]]:
  """HF module name -> (Flax module path, kind), for every module of the encoder."""
  modules = {
      "embeddings.word_embeddings": ("embeddings/word_embeddings", "embed"),
      "embeddings.position_embeddings": ("embeddings/position_embeddings", "embed"),
      "embeddings.token_type_embeddings": ("embeddings/token_type_embeddings", "embed"),
      "embeddings.LayerNorm": ("embeddings/layer_norm", "norm"),
  }
  for i in range(config.num_hidden_layers):
    hf, fx = f"encoder.layer.{i}", f"layer_{i}"
    modules.update({
        f"{hf}.attention.self.query": (f"{fx}/attention/query", "dense"),
        f"{hf}.attention.self.key": (f"{fx}/attention/key", "dense"),
        f"{hf}.attention.self.value": (f"{fx}/attention/value", "dense"),
        f"{hf}.attention.output.dense": (f"{fx}/attention/out", "dense"),
        f"{hf}.attention.output.LayerNorm": (f"{fx}/attention_norm", "norm"),
        f"{hf}.intermediate.dense": (f"{fx}/intermediate", "dense"),
        f"{hf}.output.dense": (f"{fx}/output", "dense"),
        f"{hf}.output.LayerNorm": (f"{fx}/output_norm", "norm"),
    })
  return modules


def _canonical_name(key: str) -> str:
  # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
  if key.endswith(".gamma"):
    return key[:-len("gamma")] + "weight"
  if key.endswith(".beta"):
    return key[:-len("beta")] + "bias"
  return key


def expected_params(config: BertConfig, param_dtype: Any = jnp.float32) -> Any:
  """Abstract (`jax.ShapeDtypeStruct`) params of `BertModel(config)`, without computing."""
  model = BertModel(config, param_dtype=param_dtype)
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]


def hf_to_flax(state_dict: dict[str, np.ndarray], config: BertConfig,
               param_dtype: Any = np.float32) -> dict[str, Any]:
  """Converts a Hugging Face BERT state dict to `BertModel` params.

  Args:
    state_dict: HF names -> numpy arrays, with or without the "bert." prefix.
    config: the architecture the weights belong to.
    param_dtype: dtype of the returned arrays.

  Returns:
    The nested Flax params (numpy arrays).

  Raises:
    ValueError: an encoder weight with no Flax counterpart, or a missing / mis-shaped weight,
      naming the first offending parameter.
  """
  if any(k.startswith(_PREFIX) for k in state_dict):
    encoder = {k[len(_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_PREFIX)}
    ignored = sorted(k for k in state_dict if not k.startswith(_PREFIX))
  else:
    encoder, ignored = dict(state_dict), []
  for key in list(encoder):
    if not key.startswith(("embeddings.", "encoder.")) or key in _BUFFERS:
      ignored.append(key)
      del encoder[key]
  if ignored:
    heads = sorted({k if k in _BUFFERS else k.split(".")[0] for k in ignored})
    log.info("Ignoring %d weights outside the BERT encoder (%s)", len(ignored), ", ".join(heads))

  modules = _module_map(config)
  flat = {}
  for key in sorted(encoder):
    module, _, leaf = _canonical_name(key).rpartition(".")
    if module not in modules or leaf not in _LEAVES[modules[module][1]]:
      raise ValueError(f"checkpoint weight {key!r} has no counterpart in the Flax BERT "
                       f"(num_hidden_layers={config.num_hidden_layers})")
    path, kind = modules[module]
    value = np.asarray(encoder[key])
    if kind == "dense" and leaf == "weight":
      value = value.T  # torch Linear stores [out, in]; flax Dense wants [in, out].
    flat[f"{path}/{_LEAVES[kind][leaf]}"] = value.astype(param_dtype)
  params = params_io.unflatten_params(flat)
  params_io.check_params_match(expected_params(config), params, what="BERT checkpoint weights")
  return params


def flax_to_hf(params: Any, config: BertConfig) -> dict[str, np.ndarray]:
  """Converts `BertModel` params to a Hugging Face `BertModel` state dict (no prefix).

  Args:
    params: the Flax params (numpy or jax arrays).
    config: the architecture.

  Returns:
    HF parameter names -> contiguous float32 numpy arrays (safetensors' numpy backend has no
    bfloat16).
  """
  params_io.check_params_match(expected_params(config), params, what="BERT params")
  flat = params_io.flatten_params(params)
  state = {}
  for hf_module, (path, kind) in _module_map(config).items():
    for hf_leaf, fx_leaf in _LEAVES[kind].items():
      value = np.asarray(flat[f"{path}/{fx_leaf}"], np.float32)
      if kind == "dense" and hf_leaf == "weight":
        value = value.T
      state[f"{hf_module}.{hf_leaf}"] = np.ascontiguousarray(value)
  return state


def _read_state_dict(directory: str) -> dict[str, np.ndarray]:
  """Reads the weights of an HF checkpoint directory, preferring safetensors."""
  single = os.path.join(directory, SAFETENSORS_FILE)
  index = os.path.join(directory, SAFETENSORS_INDEX)
  torch_file = os.path.join(directory, TORCH_FILE)
  if os.path.isfile(single):
    return load_file(single)
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
      state.update(load_file(os.path.join(directory, shard)))
    return state
  if os.path.isfile(torch_file):
    import torch  # pylint: disable=g-import-not-at-top  # torch is an optional extra.
    state = torch.load(torch_file, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items()}
  raise FileNotFoundError(f"no weights in {directory}: expected {SAFETENSORS_FILE}, "
                          f"{SAFETENSORS_INDEX} or {TORCH_FILE}")


def read_hf_config(directory: str | os.PathLike) -> BertConfig:
  """Reads `directory/config.json` into a `BertConfig`.

  Raises:
    FileNotFoundError: naming the missing directory or config.json.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"BERT checkpoint directory not found: {directory}")
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"missing {CONFIG_FILE} in BERT checkpoint directory: {path}")
  with open(path, encoding="utf-8") as f:
    return BertConfig.from_hf(json.load(f))


def load_hf_bert(directory: str | os.PathLike,
                 param_dtype: Any = np.float32) -> tuple[BertConfig, dict[str, Any]]:
  """Imports a Hugging Face BERT-family checkpoint directory.

  Args:
    directory: holds config.json and model.safetensors (or a sharded safetensors index, or
      pytorch_model.bin, which needs torch).
    param_dtype: dtype of the returned params.

  Returns:
    `(config, params)` with params as nested numpy arrays for `BertModel(config)`.

  Raises:
    FileNotFoundError: naming the missing directory, config.json or weights file.
    ValueError: unsupported config, or weights that do not fit it (naming the first one).
  """
  directory = os.fspath(directory)
  config = read_hf_config(directory)
  params = hf_to_flax(_read_state_dict(directory), config, param_dtype)
  log.info("Imported BERT (%d layers, hidden %d, vocab %d) from %s", config.num_hidden_layers,
           config.hidden_size, config.vocab_size, directory)
  return config, params


def save_hf_bert(directory: str | os.PathLike, config: BertConfig, params: Any) -> None:
  """Exports `BertModel` params as a Hugging Face `BertModel` directory.

  The result loads with `transformers.BertModel.from_pretrained(directory)` (which initialises
  the pooler it expects, as fundax has none) and with `load_hf_bert`.

  Args:
    directory: created if needed; config.json and model.safetensors are written into it.
    config: the architecture.
    params: the Flax params.
  """
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  state = flax_to_hf(params, config)
  save_file(state, os.path.join(directory, SAFETENSORS_FILE), metadata={"format": "pt"})
  with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config.to_hf(), f, indent=2, sort_keys=True)
  log.info("Exported BERT params (%d tensors) to %s", len(state), directory)
