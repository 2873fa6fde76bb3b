"""Weight interchange with diffusers checkpoints for the VAE (AutoencoderKL) and the UNet.

This module owns the mapping between diffusers' PyTorch state dicts and fundax's Flax parameter
trees, and the reading and writing of diffusers model directories:

```
directory/
  config.json                                 diffusers model config
  diffusion_pytorch_model.safetensors         weights (or a sharded *.safetensors.index.json)
```

The mapping is mechanical because fundax's modules mirror diffusers' module names (see
`fundax.models.layers`): `down_blocks.0.resnets.1.conv1.weight` is
`down_blocks_0/resnets_1/conv1/kernel`. Conv weights go OIHW -> HWIO, linear weights
[out, in] -> [in, out], norm weights become `scale`. This is the only place where NCHW-era
layouts are transposed. Reading needs only `safetensors.numpy`, not torch. Every import and
export is checked against the module's own parameter shapes with
`params_io.check_params_match`, so a mismatch names the first offending parameter.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from fundax.interop import params_io
from fundax.models import unet as unet_lib
from fundax.models import vae as vae_lib

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# PyTorch ModuleList / Sequential attributes: their `.<i>` entries are `_<i>` in Flax names.
_LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers",
               "upsamplers", "transformer_blocks", "to_out", "net")
_LIST_ENTRY = re.compile(r"^(%s)_(\d+)$" % "|".join(_LIST_NAMES))
# Pre-0.14 diffusers VAE attention names (AttentionBlock) -> current Attention names.
_OLD_VAE_ATTENTION = re.compile(r"(attentions\.\d+)\.(query|key|value|proj_attn)\.")
_OLD_TO_NEW = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def flax_key(key: str, ndim: int) -> tuple[str, tuple[int, ...] | None]:
  """Maps one diffusers tensor name to its Flax parameter path and layout change.

  Args:
    key: dotted PyTorch name, e.g. "down_blocks.0.resnets.1.conv1.weight".
    ndim: the tensor's rank (4: conv, 2: linear, 1: norm scale or bias).

  Returns:
    (path, perm): the "/"-joined Flax path, e.g. "down_blocks_0/resnets_1/conv1/kernel", and
    the axis permutation that turns the PyTorch array into the Flax one (None: unchanged).

  Raises:
    ValueError: a tensor that is neither a weight nor a bias.
  """
  *modules, leaf = key.split(".")
  path = []
  for part in modules:
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  if leaf == "bias":
    name, perm = "bias", None
  elif leaf == "weight" and ndim == 4:  # conv OIHW -> HWIO
    name, perm = "kernel", (2, 3, 1, 0)
  elif leaf == "weight" and ndim == 2:  # linear [out, in] -> [in, out]
    name, perm = "kernel", (1, 0)
  elif leaf == "weight" and ndim == 1:  # GroupNorm / LayerNorm
    name, perm = "scale", None
  else:
    raise ValueError(f"cannot convert tensor {key!r} of rank {ndim}")
  return "/".join(path + [name]), perm


def state_dict_to_params(state_dict: dict[str, np.ndarray],
                         param_dtype: Any = jnp.float32) -> dict[str, Any]:
  """Converts a diffusers state dict into a nested Flax parameter dict.

  Args:
    state_dict: PyTorch-layout arrays keyed by dotted module path.
    param_dtype: dtype of the returned arrays.

  Returns:
    Nested dict of host numpy arrays in Flax layout.

  Raises:
    ValueError: a tensor that is neither a weight nor a bias.
  """
  flat = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    path, perm = flax_key(key, value.ndim)
    if perm is not None:
      value = value.transpose(perm)
    flat[path] = np.ascontiguousarray(value, dtype=param_dtype)
  return params_io.unflatten_params(flat)


def params_to_state_dict(params: Any) -> dict[str, np.ndarray]:
  """Converts a Flax parameter tree into a diffusers (PyTorch-layout) float32 state dict.

  Args:
    params: nested dict of arrays as produced by `state_dict_to_params` or `model.init`.

  Returns:
    Flat dict from dotted diffusers key to contiguous float32 numpy array.
  """
  state_dict = {}
  for path, value in params_io.flatten_params(params).items():
    *modules, leaf = path.split("/")
    parts = []
    for part in modules:
      match = _LIST_ENTRY.match(part)
      parts.extend(match.groups() if match else (part,))
    value = np.asarray(value, dtype=np.float32)
    if leaf == "kernel" and value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)
    elif leaf == "kernel":
      value = value.T
    parts.append("bias" if leaf == "bias" else "weight")
    state_dict[".".join(parts)] = np.ascontiguousarray(value)
  return state_dict


def _add_variant(name: str, variant: str | None) -> str:
  """diffusers' file naming: "a.safetensors" -> "a.fp16.safetensors" (variant before suffix)."""
  if variant is None:
    return name
  stem, suffix = name.rsplit(".", 1)
  return f"{stem}.{variant}.{suffix}"


def read_checkpoint(directory: str | os.PathLike,
                    variant: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Reads a diffusers model directory's config.json and safetensors weights (no torch).

  Args:
    directory: e.g. `<pipeline>/unet` or a `save_pretrained` directory.
    variant: weights variant, e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`.

  Returns:
    (config dict, state dict of numpy arrays).

  Raises:
    FileNotFoundError: naming the missing directory, config.json or weights file.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"diffusers model directory not found: {directory}")
  config_path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isfile(config_path):
    subfolders = [d for d in ("unet", "vae") if os.path.isdir(os.path.join(directory, d))]
    hint = f" (a pipeline? try its subfolder {subfolders[0]!r})" if subfolders else ""
    raise FileNotFoundError(f"missing {CONFIG_NAME}: {config_path}{hint}")
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  weights_path = os.path.join(directory, _add_variant(WEIGHTS_NAME, variant))
  index_path = os.path.join(directory, _add_variant(WEIGHTS_NAME + ".index.json", variant))
  if os.path.isfile(weights_path):
    return config, load_file(weights_path)
  if os.path.isfile(index_path):
    with open(index_path, encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    state_dict = {}
    for shard in shards:
      state_dict.update(load_file(os.path.join(directory, shard)))
    return config, state_dict
  other = [n for n in os.listdir(directory) if n.endswith((".bin", ".ckpt", ".safetensors"))]
  hint = f"; found {other}, which fundax does not read" if other else ""
  raise FileNotFoundError(f"missing weights file {weights_path} (or its .index.json){hint}")


def _write_checkpoint(directory: str | os.PathLike, config: dict[str, Any],
                      state_dict: dict[str, np.ndarray]) -> None:
  os.makedirs(directory, exist_ok=True)
  try:
    version = importlib.metadata.version("diffusers")
  except importlib.metadata.PackageNotFoundError:
    version = "0.40.0"
  with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
    json.dump({**config, "_diffusers_version": version}, f, indent=2, sort_keys=True)
  save_file(state_dict, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
  log.info("Wrote diffusers %s (%d tensors) to %s", config["_class_name"], len(state_dict),
           directory)


def import_vae(directory: str | os.PathLike, config: vae_lib.VAEConfig | None = None,
               param_dtype: Any = jnp.float32,
               variant: str | None = None) -> tuple[vae_lib.VAEConfig, dict[str, Any]]:
  """Imports a diffusers AutoencoderKL directory (old or new attention key names).

  Args:
    directory: holds config.json and diffusion_pytorch_model.safetensors.
    config: architecture the weights must fit; default: the directory's config.json.
    param_dtype: dtype of the returned params.
    variant: weights variant to read, e.g. "fp16".

  Returns:
    (config, params) with params a nested dict of host numpy arrays.

  Raises:
    FileNotFoundError: naming a missing file.
    ValueError: naming the first parameter that does not fit the config.
  """
  raw_config, state_dict = read_checkpoint(directory, variant)
  config = config or vae_lib.VAEConfig.from_diffusers(raw_config)
  state_dict = {
      _OLD_VAE_ATTENTION.sub(lambda m: f"{m[1]}.{_OLD_TO_NEW[m[2]]}.", k): v
      for k, v in state_dict.items()
  }
  params = state_dict_to_params(state_dict, param_dtype)
  params_io.check_params_match(vae_lib.abstract_params(config), params,
                               what=f"VAE weights in {os.fspath(directory)}")
  return config, params


def import_unet(directory: str | os.PathLike, config: unet_lib.UNetConfig | None = None,
                param_dtype: Any = jnp.float32, variant: str | None = None,
                **overrides) -> tuple[unet_lib.UNetConfig, dict[str, Any]]:
  """Imports a diffusers UNet2DConditionModel directory (SD 1.x or 2.x layout).

  Args:
    directory: holds config.json and diffusion_pytorch_model.safetensors.
    config: architecture the weights must fit; default: the directory's config.json.
    param_dtype: dtype of the returned params.
    variant: weights variant to read, e.g. "fp16".
    **overrides: fundax-only config fields when reading config.json (`remat`,
      `prediction_type`).

  Returns:
    (config, params) with params a nested dict of host numpy arrays.

  Raises:
    FileNotFoundError: naming a missing file.
    ValueError: an unsupported diffusers option, or naming the first parameter that does not
      fit the config.
  """
  raw_config, state_dict = read_checkpoint(directory, variant)
  config = config or unet_lib.UNetConfig.from_diffusers(raw_config, **overrides)
  params = state_dict_to_params(state_dict, param_dtype)
  params_io.check_params_match(unet_lib.abstract_params(config), params,
                               what=f"UNet weights in {os.fspath(directory)}")
  return config, params


def export_vae(directory: str | os.PathLike, config: vae_lib.VAEConfig, params: Any) -> None:
  """Writes `params` as a diffusers AutoencoderKL directory (`from_pretrained` loads it).

  Args:
    directory: created if needed; existing files are overwritten.
    config: the VAE architecture.
    params: the VAE's parameter tree (any float dtype; written as float32).

  Raises:
    ValueError: naming the first parameter that does not fit `config`.
  """
  params_io.check_params_match(vae_lib.abstract_params(config), params, what="VAE params")
  _write_checkpoint(directory, config.to_diffusers(), params_to_state_dict(params))


def export_unet(directory: str | os.PathLike, config: unet_lib.UNetConfig, params: Any) -> None:
  """Writes `params` as a diffusers UNet2DConditionModel directory.

  Args:
    directory: created if needed; existing files are overwritten.
    config: the UNet architecture (fundax-only fields are not written).
    params: the UNet's parameter tree (any float dtype; written as float32).

  Raises:
    ValueError: naming the first parameter that does not fit `config`.
  """
  params_io.check_params_match(unet_lib.abstract_params(config), params, what="UNet params")
  _write_checkpoint(directory, config.to_diffusers(), params_to_state_dict(params))
