"""`fundax convert` and `fundax export diffusers` through the CLI, on tiny real checkpoints.

The PyTorch models (transformers BertModel, diffusers UNet2DConditionModel / AutoencoderKL)
are the references: a converted model must reproduce their outputs, and an exported one must
load back in diffusers and reproduce them too.
"""

import json
import shutil

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fundax import cli
from fundax.data import tokenizer as tokenizer_lib
from fundax.interop import params_io
from fundax.models import text_encoder, unet

UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           latent_channels=4, norm_num_groups=8, sample_size=16)


def _randomize(model):
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (p == 1).float())
  return model.eval()


def _unet_out(model, x, t, ctx):
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                torch.from_numpy(ctx)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def test_unet_convert_then_export_round_trip(tmp_path, capsys):
  reference = _randomize(diffusers.UNet2DConditionModel(**UNET))
  reference.save_pretrained(tmp_path / "hf")
  assert cli.main(["convert", "unet", str(tmp_path / "hf"), str(tmp_path / "fx")]) == 0
  assert json.loads(capsys.readouterr().out)["parameters"] == sum(
      p.numel() for p in reference.parameters())

  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t = np.array([3, 900])
  ctx = rng.standard_normal((2, 6, 32)).astype(np.float32)
  params, meta = params_io.load_params(tmp_path / "fx", expected_kind="unet")
  model = unet.UNet2DConditionModel(unet.UNetConfig.from_diffusers(meta["config"]))
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t),
                                jnp.asarray(ctx)))
  expected = _unet_out(reference, x, t, ctx)
  assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-4

  assert cli.main(["export", "diffusers", str(tmp_path / "fx"), str(tmp_path / "out")]) == 0
  reloaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out").eval()
  again = _unet_out(reloaded, x, t, ctx)
  assert np.abs(again - expected).max() / np.abs(expected).max() < 1e-5


def test_vae_convert_then_export_round_trip(tmp_path):
  reference = _randomize(diffusers.AutoencoderKL(**VAE))
  reference.save_pretrained(tmp_path / "hf")
  assert cli.main(["convert", "vae", str(tmp_path / "hf"), str(tmp_path / "fx")]) == 0
  assert cli.main(["export", "diffusers", str(tmp_path / "fx"), str(tmp_path / "out")]) == 0
  reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out").eval()
  x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(x, sample_posterior=False).sample.numpy(),
                               reference(x, sample_posterior=False).sample.numpy(),
                               rtol=1e-5, atol=1e-5)


def test_bert_convert_matches_transformers(tmp_path):
  config = transformers.BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=37)
  torch.manual_seed(0)
  reference = transformers.BertModel(config, add_pooling_layer=False).eval()
  reference.save_pretrained(tmp_path / "hf")
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(25)]
  (tmp_path / "hf" / "vocab.txt").write_text("\n".join(vocab) + "\n")
  assert cli.main(["convert", "bert", str(tmp_path / "hf"), str(tmp_path / "fx")]) == 0
  shutil.rmtree(tmp_path / "hf")  # the converted directory carries its vocabulary

  encoder, params, tokenizer = text_encoder.load_text_encoder(str(tmp_path / "fx"))
  assert tokenizer["vocab_size"] == 30 and tokenizer["path"] == str(tmp_path / "fx" / "tokenizer")
  words = tokenizer_lib.make_tokenizer_from_reference(tokenizer)
  np.testing.assert_array_equal(tokenizer_lib.tokenize(words, ["w2 w4"], 6)["input_ids"],
                                [[2, 7, 9, 3, 0, 0]])
  ids = np.array([[2, 7, 9, 3, 0, 0]])
  mask = (ids > 0).astype(np.int32)
  ours = np.asarray(encoder.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
  with torch.no_grad():
    expected = reference(torch.from_numpy(ids), torch.from_numpy(mask)).last_hidden_state.numpy()
  np.testing.assert_allclose(ours[:, :4], expected[:, :4], atol=1e-4)


@pytest.mark.parametrize("argv,message", [
    (["convert", "unet", "{tmp}/nothere", "{tmp}/dst"], "nothere"),
    (["export", "diffusers", "{tmp}/nothere", "{tmp}/dst"], "nothere"),
])
def test_missing_inputs_are_named(tmp_path, capsys, argv, message):
  argv = [a.format(tmp=tmp_path) for a in argv]
  assert cli.main(argv) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "dst").exists()


def test_convert_refuses_to_overwrite(tmp_path, capsys):
  reference = _randomize(diffusers.AutoencoderKL(**VAE))
  reference.save_pretrained(tmp_path / "hf")
  assert cli.main(["convert", "vae", str(tmp_path / "hf"), str(tmp_path / "fx")]) == 0
  assert cli.main(["convert", "vae", str(tmp_path / "hf"), str(tmp_path / "fx")]) == 2
  assert "already exists" in capsys.readouterr().err
  assert cli.main(["convert", "vae", str(tmp_path / "hf"), str(tmp_path / "fx"),
                   "--overwrite"]) == 0


def test_export_rejects_a_text_encoder(tmp_path, capsys):
  config = transformers.BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, intermediate_size=37)
  transformers.BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "hf")
  assert cli.main(["convert", "bert", str(tmp_path / "hf"), str(tmp_path / "fx")]) == 0
  assert cli.main(["export", "diffusers", str(tmp_path / "fx"), str(tmp_path / "out")]) == 2
  assert "vae or unet" in capsys.readouterr().err
