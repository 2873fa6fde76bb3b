"""Ahead-of-time compilation of the tiny LDM config (one UNet level) for a 4-chip TPU v5e
slice, on this CPU host.

Needs the libtpu package (the `tpu` and `test` extras): XLA's TPU compiler runs here with no
TPU attached. One module-scoped compile (train step with fully sharded state, the sampler and
the RLHF update) serves every test.
"""

import math

import jax
import pytest

from fundax import aot
from fundax import configlib
from fundax import parallel

TOPOLOGY = "v5e:2x2"


@pytest.fixture(scope="module")
def report():
  config = configlib.load_config("configs/ldm.py:tiny")
  # XLA's attention, the TPU choice (the tiny config's "flash" is for CPUs); a one-level UNet,
  # which the TPU compiler takes half the two-level one's time to compile. (At width 32 the
  # compiler reports more aliased bytes per chip than the whole unsharded state, so the
  # state bound below cannot be checked there.)
  configlib.apply_overrides(config, ["text_encoder=random", "sample.num_steps=1",
                                     "unet.attention_impl=xla", "unet.block_out_channels=(64,)",
                                     "unet.cross_attention=(True,)"])
  with config.unlocked():
    config.mesh = {"data": 1, "fsdp": -1}
  rlhf = configlib.load_config("configs/rlhf.py:test")
  return aot.run(config, TOPOLOGY, cached_latents=True, sampler=True, rlhf=rlhf)


def test_topology_devices_and_mesh(report):
  assert report["device_kind"] == "TPU v5 lite"
  assert (report["chips"], report["devices"]) == (4, 4)
  assert report["mesh"] == {"data": 1, "fsdp": 4}
  assert report["batch_per_chip"] == report["batch_size"] / 4


def test_train_step_state_is_sharded_and_fits(report):
  mem = report["train_step"]["memory"]
  # The state is params + two Adam moments + EMA, float32, and it is donated (aliased to the
  # new state); with fsdp over 4 chips each chip holds between a quarter of it (every tensor
  # sharded) and all of it (none sharded).
  state_gib = report["unet_params"] * 4 * 4 / aot.GIB
  assert state_gib / 4 <= mem["aliased"] < state_gib, mem
  assert mem["arguments"] > mem["aliased"]  # + the batch and the frozen text encoder
  assert mem["fits"] and mem["hbm"] == 16
  assert math.isclose(mem["peak"], mem["arguments"] + mem["outputs"] - mem["aliased"]
                      + mem["temporaries"] + mem["code"])
  assert report["train_step"]["cost"]["flops"] > 0
  assert report["train_step"]["compile_s"] > 0


def test_sampler_compiles(report):
  sampler = report["sampler"]
  assert sampler["batch"] == 4
  assert sampler["memory"]["fits"] and sampler["cost"]["flops"] > 0


def test_rlhf_update_compiles_on_sharded_rollouts(report):
  update = report["rlhf_update"]
  # configs/rlhf.py:test: 3 DDIM steps, the last deterministic (alpha-bar 1), half trained.
  assert (update["batch"], update["num_steps"], update["trained_steps"]) == (
      report["batch_size"], 3, 1)
  mem = update["memory"]
  assert mem["fits"] and mem["aliased"] > 0  # the donated UNet state
  # The update runs the UNet forward and backward at least once per trained step.
  assert update["cost"]["flops"] > report["train_step"]["cost"]["flops"] / 4


def test_v4_is_described_one_device_per_chip():
  # libtpu's default v4 description has a device per TensorCore (16 for 8 chips), which
  # jax.make_mesh refuses on TPU > v3; fundax asks for megacore mode instead.
  topo = aot.get_topology("v4:2x2x2")
  assert (topo.chips, len(topo.devices), topo.devices_per_chip) == (8, 8, 1)
  assert topo.device_kind == "TPU v4" and topo.hbm_bytes_per_device == 32 * aot.GIB
  assert len({tuple(d.coords) for d in topo.devices}) == 8
  mesh = parallel.make_mesh({"data": 1, "fsdp": -1}, devices=list(topo.devices))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8}


def test_bad_topology_names_the_format():
  with pytest.raises(ValueError, match="GENERATION:GRID"):
    aot.get_topology("v5e-16")


def test_program_too_big_for_hbm_is_reported_not_raised():
  def too_big():
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total "
                                     "memory required (27.07G) exceeds available HBM (15.75G).")
  analysis = aot._analyse("train step", too_big, 16 * aot.GIB)  # pylint: disable=protected-access
  assert analysis["memory"]["fits"] is False and analysis["cost"] == {}
  assert "27.07G" in analysis["memory"]["error"] and analysis["memory"]["hbm"] == 16
  assert "DOES NOT FIT" in aot.format_report(
      {"topology": "v5e:4x4", "chips": 16, "devices": 16, "device_kind": "TPU v5 lite",
       "mesh": {"fsdp": 16}, "unet_params": 8.6e8, "text_params": 1.1e8, "vae_params": 8.4e7,
       "resolution": 512, "latent_shape": [64, 64, 4], "dtype": "bfloat16", "remat": True,
       "attention_chunk": 0, "cached_latents": True, "batch_size": 256, "batch_per_chip": 16,
       "train_step": analysis})

  def other_error():
    raise jax.errors.JaxRuntimeError("INVALID_ARGUMENT: something else")
  with pytest.raises(jax.errors.JaxRuntimeError, match="INVALID_ARGUMENT"):
    aot._analyse("train step", other_error, None)  # pylint: disable=protected-access
