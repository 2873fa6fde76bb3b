"""Tests for fundax.parallel (mesh part) on 8 simulated CPU devices."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fundax import parallel


def test_eight_devices():
  assert jax.device_count() == 8, "conftest.py should simulate 8 CPU devices"


@pytest.mark.parametrize("config, expected", [
    ({"data": -1, "fsdp": 1}, {"data": 8, "fsdp": 1}),
    ({"fsdp": 2, "data": -1}, {"data": 4, "fsdp": 2}),
    ({"data": 2, "fsdp": -1, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}),
    ({"data": 8}, {"data": 8}),
])
def test_mesh_shape(config, expected):
  shape = parallel.mesh_shape(config, 8)
  assert shape == expected and list(shape) == list(expected)


@pytest.mark.parametrize("config, match", [
    ({"data": 3, "fsdp": -1}, "do not divide"),
    ({"data": 2, "fsdp": 2}, "4 devices but 8"),
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": 0, "fsdp": -1}, ">= 1"),
    ({}, "no axes"),
])
def test_bad_mesh_config(config, match):
  with pytest.raises(ValueError, match=match):
    parallel.make_mesh(config)


def test_make_mesh_from_configdict():
  mesh = parallel.make_mesh(ml_collections.ConfigDict({"fsdp": 2, "data": -1}))
  assert mesh.axis_names == ("data", "fsdp")
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert mesh.devices.size == 8 and len(set(mesh.devices.flat)) == 8
  assert parallel.batch_size_divisor(mesh) == 8
  assert parallel.batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_batch_axes_exclude_model_axes():
  mesh = parallel.make_mesh({"data": 2, "tensor": 4})
  assert parallel.batch_axes(mesh) == ("data",)
  assert parallel.batch_size_divisor(mesh) == 2


def test_host_local_to_global():
  mesh = parallel.make_mesh({"data": -1, "fsdp": 2})
  batch = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
           "y": np.arange(16, dtype=np.int32)}
  out = parallel.host_local_to_global(batch, mesh)
  for key, value in out.items():
    assert isinstance(value, jax.Array)
    assert value.sharding.spec == P(("data", "fsdp"))
    assert len(value.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(value), batch[key])
  # Each device holds 2 consecutive rows of the batch.
  rows = sorted(int(s.data[0]) for s in out["y"].addressable_shards)
  assert rows == list(range(0, 16, 2))
  assert {s.data.shape for s in out["x"].addressable_shards} == {(2, 3)}
  # A plain (single-device) reduction runs on the sharded array.
  assert float(jax.jit(lambda b: b["x"].mean())(out)) == pytest.approx(batch["x"].mean())


def test_maybe_initialize_distributed(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda: calls.append(1))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
  monkeypatch.delenv(parallel.DISTRIBUTED_ENV, raising=False)
  monkeypatch.delenv(parallel.COORDINATOR_ENV, raising=False)
  assert not parallel.maybe_initialize_distributed(None) and not calls
  assert not parallel.maybe_initialize_distributed(False) and not calls
  monkeypatch.setenv(parallel.DISTRIBUTED_ENV, "1")
  assert not parallel.maybe_initialize_distributed(False) and not calls  # the flag wins
  assert parallel.maybe_initialize_distributed(None) and calls == [1]
  assert parallel.maybe_initialize_distributed(True) and calls == [1]  # idempotent
  monkeypatch.delenv(parallel.DISTRIBUTED_ENV)
  calls.clear()
  monkeypatch.setenv(parallel.COORDINATOR_ENV, "10.0.0.1:1234")
  assert parallel.maybe_initialize_distributed(None) and calls == [1]


def test_jit_once_computes_what_jit_computes():
  """An init compiled without backend optimisation draws the same bits and the same params
  (to float32 rounding: XLA's optimiser may fuse a multiply-add differently)."""
  def init(key):
    bits = jax.random.bits(key, (64,))
    return bits, jax.random.truncated_normal(key, -2.0, 2.0, (64, 64)) * 0.02

  (bits, weights), (bits_once, weights_once) = jax.jit(init)(jax.random.key(3)), (
      parallel.jit_once(init)(jax.random.key(3)))
  np.testing.assert_array_equal(bits_once, bits)
  np.testing.assert_allclose(weights_once, weights, rtol=0, atol=1e-8)


def test_inits_compile_with_the_run_once_options(monkeypatch):
  """`init_sharded` compiles through `jit_once`, whose jit carries RUN_ONCE_OPTIONS (no backend
  optimisation): the options are what makes an init cheap to compile."""
  jit, options = jax.jit, []

  def spy(fn, **kwargs):
    options.append(kwargs.get("compiler_options"))
    return jit(fn, **kwargs)

  monkeypatch.setattr(jax, "jit", spy)
  mesh = parallel.make_mesh({"data": -1})
  params = parallel.init_sharded(lambda key: {"w": jax.random.normal(key, (8, 4))},
                                 jax.random.key(0), mesh)
  assert params["w"].shape == (8, 4)
  assert options and options[-1] == {"xla_backend_optimization_level": 0}
