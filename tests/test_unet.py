"""Tests for the Flax UNet2DConditionModel and its diffusers import/export.

Parity is against diffusers' PyTorch UNet2DConditionModel with the same weights, on two tiny
random configs: SD 1.x style (1x1-conv projections, one head count) and SD 2.x style (linear
projections, per-block head counts).
"""

import dataclasses
import functools
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from fundax.interop import diffusers as dfx  # pylint: disable=g-import-not-at-top
from fundax.interop import params_io  # pylint: disable=g-import-not-at-top
from fundax.models import unet  # pylint: disable=g-import-not-at-top

TOL = 1e-4
SD1 = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
           cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
SD2 = dict(SD1, use_linear_projection=True, attention_head_dim=(2, 4))
# The real Stable Diffusion 1.5 and 2.1 UNet configs (layout only: checked on shapes).
SD15_FULL = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
SD21_FULL = dict(SD15_FULL, sample_size=96, cross_attention_dim=1024,
                 attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                 upcast_attention=True)


def rel_err(a, b):
  """max|a - b| / max|b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def randomize(model, seed=0):
  """Fills every parameter with noise: norm scales near 1, everything else near 0.

  diffusers' init leaves norm biases at 0 and scales at 1, which would hide swapped leaves.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if p.ndim == 1 and name.endswith("weight") else 0.0
      p.copy_(base + 0.05 * torch.randn(p.shape, generator=gen))
  return model


def inputs(seed, batch=2, height=16, width=16):
  """NCHW torch inputs and the matching NHWC jax inputs."""
  gen = torch.Generator().manual_seed(seed)
  x = torch.randn(batch, 4, height, width, generator=gen)
  t = torch.tensor([10, 700][:batch])
  ctx = torch.randn(batch, 8, 32, generator=gen)
  jax_in = (jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()),
            jnp.asarray(ctx.numpy()))
  return (x, t, ctx), jax_in


def torch_forward(model, torch_in):
  with torch.no_grad():
    return model(*torch_in).sample.numpy().transpose(0, 2, 3, 1)


def make_checkpoint(tmp_path_factory, config, name):
  torch.manual_seed(0)
  model = randomize(diffusers.UNet2DConditionModel(**config).eval())
  directory = tmp_path_factory.mktemp(name)
  model.save_pretrained(directory)
  return model, str(directory)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  return make_checkpoint(tmp_path_factory, SD1, "unet_sd1")


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
  return make_checkpoint(tmp_path_factory, SD2, "unet_sd2")


@pytest.fixture(scope="module")
def sd1_imported(sd1):
  return dfx.import_unet(sd1[1])


@functools.lru_cache(maxsize=None)
def apply_fn(config, dtype=jnp.float32):
  """One jitted forward per (config, dtype), shared by the tests to save compiles."""
  model = unet.UNet2DConditionModel(config, dtype=dtype)
  return jax.jit(lambda params, *args: model.apply({"params": params}, *args))


LOWERING_MASK = np.array([[1] * 8, [1] * 5 + [0] * 3], bool)


def lowering_run(config, params):
  """The UNet's output on `inputs(8)` under LOWERING_MASK and the gradients of its mean square,
  through `config`'s lowering: one jitted program for both (one compile per lowering)."""
  _, (jx, jt, jctx) = inputs(8)
  model = unet.UNet2DConditionModel(config)

  def loss(p):
    out = model.apply({"params": p}, jx, jt, jctx, jnp.asarray(LOWERING_MASK))
    return jnp.mean(out ** 2), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return out, grads


@pytest.fixture(scope="module")
def plain_run(sd1_imported):
  """The plain lowering's output and gradients, which every other lowering is compared with."""
  return lowering_run(*sd1_imported)


def test_sd1_parity(sd1, sd1_imported):
  torch_model, _ = sd1
  config, params = sd1_imported
  assert not config.use_linear_projection and config.attention_head_dim == 8
  torch_in, jax_in = inputs(0)
  err = rel_err(apply_fn(config)(params, *jax_in), torch_forward(torch_model, torch_in))
  print(f"SD1-style UNet parity: rel err {err:.2e}")
  assert err <= TOL


def test_sd2_parity_including_odd_sizes(sd2):
  torch_model, directory = sd2
  config, params = dfx.import_unet(directory)
  assert config.use_linear_projection and config.attention_head_dim == (2, 4)
  assert params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == (32, 32)
  fn = apply_fn(config)
  # 9 rows do not halve evenly: diffusers then upsamples to the skip's size.
  for height, width in ((16, 16), (9, 12)):
    torch_in, jax_in = inputs(1, height=height, width=width)
    err = rel_err(fn(params, *jax_in), torch_forward(torch_model, torch_in))
    print(f"SD2-style UNet parity at {height}x{width}: rel err {err:.2e}")
    assert err <= TOL


def test_scalar_timestep_and_mask(sd1, sd1_imported):
  torch_model, _ = sd1
  config, params = sd1_imported
  (x, _, ctx), (jx, _, jctx) = inputs(2)
  mask = np.array([[1] * 8, [1] * 5 + [0] * 3], bool)
  with torch.no_grad():
    ref = torch_model(x, 250, ctx, encoder_attention_mask=torch.tensor(mask)).sample
  out = apply_fn(config)(params, jx, 250, jctx, jnp.asarray(mask))
  assert rel_err(out, ref.numpy().transpose(0, 2, 3, 1)) <= TOL


def test_export_loads_in_diffusers(tmp_path):
  """fundax params -> diffusers directory -> from_pretrained, same outputs."""
  config = unet.UNetConfig(**SD2)
  # Random leaves of the module's own shapes (compiling model.init is slow on CPU); nonzero
  # biases and scales so a swapped leaf cannot hide.
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype),
                        unet.abstract_params(config))
  dfx.export_unet(tmp_path, config, params)
  torch_model = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
  torch_in, jax_in = inputs(5)
  err = rel_err(apply_fn(config)(params, *jax_in), torch_forward(torch_model, torch_in))
  print(f"UNet export round trip: rel err {err:.2e}")
  assert err <= TOL
  _, back = dfx.import_unet(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))


def test_bf16_forward_is_finite(sd1_imported):
  config, params = sd1_imported
  _, jax_in = inputs(6)
  out = apply_fn(config, jnp.bfloat16)(params, *jax_in)
  ref = apply_fn(config)(params, *jax_in)
  assert out.dtype == jnp.bfloat16
  assert bool(jnp.isfinite(out.astype(jnp.float32)).all())
  assert rel_err(out.astype(jnp.float32), ref) < 0.1


def test_no_retrace_on_repeated_calls(sd1_imported):
  config, params = sd1_imported
  model = unet.UNet2DConditionModel(config)
  traces = []

  @jax.jit
  def fwd(params, x, t, ctx):
    traces.append(1)
    return model.apply({"params": params}, x, t, ctx)

  for seed in range(3):
    _, (x, t, ctx) = inputs(seed)
    fwd(params, x, t + seed, ctx).block_until_ready()
  assert len(traces) == 1


def test_remat_wraps_blocks_and_keeps_outputs(sd1_imported):
  config, params = sd1_imported
  remat_config = dataclasses.replace(config, remat=True)
  _, jax_in = inputs(7)
  np.testing.assert_array_equal(apply_fn(remat_config)(params, *jax_in),
                                apply_fn(config)(params, *jax_in))

  def grad_jaxpr(cfg):
    model = unet.UNet2DConditionModel(cfg)
    loss = lambda p: jnp.mean(model.apply({"params": p}, *jax_in) ** 2)
    return str(jax.make_jaxpr(jax.grad(loss))(params))

  # Gradients through jax.checkpoint equal plain ones by construction; what can break is the
  # wiring, so check each down/mid/up block (5 here) is rematerialised, and only with the flag.
  assert grad_jaxpr(remat_config).count("remat") >= 5
  assert "remat" not in grad_jaxpr(config)


def test_query_chunked_attention_keeps_outputs_and_gradients(sd1_imported, plain_run):
  config, params = sd1_imported
  chunked = dataclasses.replace(config, attention_chunk=64)  # 256 tokens at 16x16: 4 chunks
  _, jax_in = inputs(8)
  out, grads = lowering_run(chunked, params)
  np.testing.assert_allclose(out, plain_run[0], rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_run[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  jaxpr = lambda cfg: str(jax.make_jaxpr(apply_fn(cfg))(params, *jax_in))
  assert "scan" in jaxpr(chunked) and "scan" not in jaxpr(config)


def test_chunked_attention_masks_keys_and_rejects_bad_chunks():
  from fundax.models import attention  # pylint: disable=g-import-not-at-top
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 12, 2, 4)) for i in range(3))
  mask = (jnp.arange(12)[None, :] < jnp.array([[5], [12]]))[:, None, None, :]
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v, mask, query_chunk=4),
                             jax.nn.dot_product_attention(q, k, v, mask=mask), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="must divide"):
    attention.dot_product_attention(q, k, v, query_chunk=5)


LOWERINGS = {  # UNetConfig fields -> forward tolerance against diffusers (float32 reference)
    "flash": (dict(attention_impl="flash"), TOL),
    "matmul_convs": (dict(conv_impl="matmul"), TOL),
    "cpu_fast": (dict(attention_impl="flash", conv_impl="matmul"), TOL),
    # bfloat16 operands keep ~3 significant digits per product.
    "bf16_matmuls": (dict(attention_impl="flash", conv_impl="matmul",
                          matmul_dtype="bfloat16"), 3e-2),
}


@pytest.mark.parametrize("name", sorted(LOWERINGS))
def test_lowerings_match_diffusers_and_the_plain_gradients(sd1, sd1_imported, plain_run, name):
  """Each lowering computes diffusers' UNet (same weights) and the same gradients."""
  torch_model, _ = sd1
  config, params = sd1_imported
  fields, tol = LOWERINGS[name]
  lowered = dataclasses.replace(config, **fields)
  (x, t, ctx), _ = inputs(8)
  with torch.no_grad():
    ref = torch_model(x, t, ctx, encoder_attention_mask=torch.tensor(LOWERING_MASK)).sample
  out, lowered_grads = lowering_run(lowered, params)
  err = rel_err(out, ref.numpy().transpose(0, 2, 3, 1))
  print(f"UNet lowering {name}: rel err {err:.2e} against diffusers")
  assert err <= tol

  plain_grads = plain_run[1]
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain_grads))
  worst = max(float(jnp.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(lowered_grads), jax.tree.leaves(plain_grads)))
  assert worst <= (1e-4 if tol == TOL else 5e-2) * scale


def test_unknown_lowering_fails_when_configured():
  with pytest.raises(ValueError, match="attention_impl"):
    unet.UNetConfig(**SD1, attention_impl="fast")
  with pytest.raises(ValueError, match="conv_impl"):
    unet.UNetConfig(**SD1, conv_impl="im2col")
  with pytest.raises(ValueError, match="matmul_dtype"):
    unet.UNetConfig(**SD1, matmul_dtype="float16")


@pytest.mark.parametrize("config", [SD15_FULL, SD21_FULL], ids=["sd15", "sd21"])
def test_full_size_layouts_match_diffusers(config):
  """Every tensor of the real SD 1.5 / 2.1 UNets maps onto a fundax parameter of that shape."""
  with torch.device("meta"):  # shapes only: no memory, no init compute
    state_dict = diffusers.UNet2DConditionModel(**config).state_dict()
  shapes = {}
  for key, tensor in state_dict.items():
    path, perm = dfx.flax_key(key, tensor.ndim)
    shape = tuple(tensor.shape[i] for i in perm) if perm else tuple(tensor.shape)
    shapes[path] = jax.ShapeDtypeStruct(shape, jnp.float32)
  params_io.check_params_match(unet.abstract_params(unet.UNetConfig(**config)),
                               params_io.unflatten_params(shapes))


# Sorted parameter paths of UNetConfig(**SD1); a rename breaks checkpoint interchange.
SD1_PARAM_COUNT = 208
SD1_PARAM_SAMPLE = (
    "conv_in/kernel",
    "down_blocks_0/attentions_0/proj_in/kernel",
    "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_out_0/bias",
    "down_blocks_0/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel",
    "down_blocks_0/downsamplers_0/conv/kernel",
    "mid_block/resnets_1/time_emb_proj/kernel",
    "time_embedding/linear_2/kernel",
    "up_blocks_0/resnets_1/conv_shortcut/kernel",
    "up_blocks_0/upsamplers_0/conv/kernel",
    "up_blocks_1/attentions_1/transformer_blocks_0/norm3/scale",
)
SD1_PARAM_SHA256 = "1feb59edcdfec175e86bde241707bf3af2b066349d84333b640b43f0b77288be"


def test_param_names_snapshot():
  paths = sorted(params_io.flatten_params(unet.abstract_params(unet.UNetConfig(**SD1))))
  listing = "\n".join(paths)
  for path in SD1_PARAM_SAMPLE:
    assert path in paths, f"{path} missing; paths are:\n{listing}"
  digest = hashlib.sha256(listing.encode()).hexdigest()
  assert (len(paths), digest) == (SD1_PARAM_COUNT, SD1_PARAM_SHA256), f"paths:\n{listing}"


def test_mismatched_checkpoint_names_first_bad_param(sd1, tmp_path):
  _, directory = sd1
  with pytest.raises(ValueError, match=r"'down_blocks_0/attentions_0/proj_in/kernel'"):
    dfx.import_unet(directory, config=unet.UNetConfig(**SD2))
  # config.json claiming other widths than the weights have.
  bad = tmp_path / "bad"
  shutil.copytree(directory, bad)
  raw = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**raw, "block_out_channels": [32, 48]}))
  with pytest.raises(ValueError, match=r"shape mismatch for parameter 'down_blocks_1/"):
    dfx.import_unet(bad)


def test_missing_files_are_named(sd1, tmp_path):
  _, directory = sd1
  shutil.copy(os.path.join(directory, "config.json"), tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
    dfx.import_unet(tmp_path)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    dfx.import_unet(empty)


def test_unsupported_diffusers_option_is_rejected():
  with pytest.raises(ValueError, match="class_embed_type"):
    unet.UNetConfig.from_diffusers({**SD1, "class_embed_type": "timestep"})
  config = unet.UNetConfig.from_diffusers({**SD1, "_class_name": "UNet2DConditionModel",
                                           "only_cross_attention": [False, False]})
  assert unet.UNetConfig.from_diffusers(config.to_diffusers()) == config
  # params_io stores configs as JSON next to the params.
  as_json = json.loads(json.dumps(dataclasses.asdict(config)))
  assert unet.UNetConfig(**as_json) == config


def test_coordinate_input_locates_the_network_and_has_no_diffusers_form():
  config = unet.UNetConfig(**SD1, coordinate_input=True)
  params = unet.abstract_params(config)
  assert params["conv_in"]["kernel"].shape[2] == SD1["in_channels"] + 2
  model = unet.UNet2DConditionModel(config)
  sample, t, context = unet.dummy_inputs(config)
  params = jax.jit(model.init)(jax.random.key(0), sample, t, context)["params"]
  # conv_in reads the coordinates: zeroing their kernel taps changes the output.
  ones = jnp.ones((1, 16, 16, 4))
  apply = jax.jit(model.apply)  # one compile for both calls (eager, the UNet takes ~40 s)
  out = np.asarray(apply({"params": params}, ones, t, context))
  kernel = params["conv_in"]["kernel"].at[:, :, 4:].set(0.0)
  blind = {**params, "conv_in": {**params["conv_in"], "kernel": kernel}}
  assert np.abs(out - np.asarray(apply({"params": blind}, ones, t, context))).max() > 1e-3
  np.testing.assert_array_equal(unet.coordinate_channels(ones)[0, 0, [0, -1], 0], [-1.0, 1.0])
  # Checkpoints keep the field; a diffusers export refuses rather than drop the channels.
  assert unet.UNetConfig.from_diffusers(config.to_checkpoint()) == config
  with pytest.raises(ValueError, match="coordinate_input"):
    config.to_diffusers()
