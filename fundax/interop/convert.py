"""`fundax convert` and `fundax export`: whole checkpoints between ecosystems.

`convert` reads a PyTorch-ecosystem checkpoint directory (Hugging Face BERT, diffusers VAE or
UNet) and writes a fundax params directory: an Orbax params checkpoint plus `config.json` with
the model config, so the directory alone rebuilds the model. `export_diffusers` goes the other
way for the diffusion models, so a model trained in fundax loads in diffusers.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fundax.interop import diffusers, hf_bert, params_io
from fundax.models import unet as unet_lib
from fundax.models import vae as vae_lib

CONVERTIBLE = ("bert", "vae", "unet")

log = logging.getLogger(__name__)


def convert(kind: str, src: str | os.PathLike, dst: str | os.PathLike,
            *, overwrite: bool = False) -> dict[str, Any]:
  """Converts a Hugging Face / diffusers checkpoint directory into a fundax params directory.

  Args:
    kind: "bert" (Hugging Face BERT layout), "vae" (diffusers AutoencoderKL) or "unet"
      (diffusers UNet2DConditionModel, SD 1.x or 2.x layout).
    src: the source directory (for diffusers pipelines, its `vae/` or `unet/` subfolder).
    dst: the fundax params directory to write.
    overwrite: replace an existing `dst`.

  Returns:
    A summary: kind, source, destination and parameter count.
  """
  src, dst = os.fspath(src), os.fspath(dst)
  files = {}  # copied into dst beside the weights
  if kind == "bert":
    # Imported here: the tokenizer module pulls in transformers, only needed for text.
    from fundax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    config, params = hf_bert.load_hf_bert(src)
    params = {"bert": params}  # the TextEncoder layout, without a projection
    model_config = {"bert": config.to_hf(), "projection_dim": None}
    # The vocabulary travels with the weights: the converted directory outlives `src`.
    bundle = tokenizer_lib.bundle_tokenizer(src)
    if bundle is None:
      log.warning("%s has no vocab.txt or tokenizer.json: the converted text encoder carries no "
                  "tokenizer, and sampling will need one named explicitly", src)
    reference, files = bundle or (None, {})
    extra = {"source": src, "tokenizer": reference}
  elif kind == "vae":
    config, params = diffusers.import_vae(src)
    model_config, extra = config.to_diffusers(), {"source": src}
  elif kind == "unet":
    config, params = diffusers.import_unet(src)
    model_config, extra = config.to_diffusers(), {"source": src}
  else:
    raise ValueError(f"convert: kind must be one of {CONVERTIBLE}, got {kind!r}")
  params_io.save_params(dst, params, model_config, kind, extra=extra, files=files,
                        overwrite=overwrite)
  count = sum(int(v.size) for v in params_io.flatten_params(params).values())
  return {"kind": kind, "source": src, "destination": dst, "parameters": count}


def export_diffusers(checkpoint: str | os.PathLike, dst: str | os.PathLike) -> dict[str, Any]:
  """Writes a fundax VAE or UNet params directory as a diffusers model directory.

  Args:
    checkpoint: a fundax params directory of kind "vae" or "unet".
    dst: the directory to write (config.json + diffusion_pytorch_model.safetensors), loadable
      with `diffusers.AutoencoderKL.from_pretrained` / `UNet2DConditionModel.from_pretrained`.

  Returns:
    A summary: kind, source and destination.
  """
  checkpoint, dst = os.fspath(checkpoint), os.fspath(dst)
  meta = params_io.load_meta(checkpoint)
  kind = meta["kind"]
  if kind not in ("vae", "unet"):
    raise ValueError(f"{checkpoint} holds a {kind!r} model; diffusers export takes a vae or unet")
  params, _ = params_io.load_params(checkpoint, expected_kind=kind)
  if kind == "vae":
    diffusers.export_vae(dst, vae_lib.VAEConfig.from_diffusers(meta["config"]), params)
  else:
    diffusers.export_unet(dst, unet_lib.UNetConfig.from_diffusers(meta["config"]), params)
  return {"kind": kind, "source": checkpoint, "destination": dst}
