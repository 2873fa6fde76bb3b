"""Tests for fundax.interop.params_io: round trips, metadata checks and mismatch messages."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundax.interop import params_io


def _tree():
  rng = np.random.default_rng(0)
  return {
      "dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                "bias": jnp.arange(4, dtype=jnp.float32)},
      "norm": {"scale": jnp.ones((5,), jnp.bfloat16)},
  }


def test_round_trip_values_dtypes_and_meta(tmp_path):
  params = _tree()
  params_io.save_params(tmp_path / "enc", params, {"hidden_size": 32}, "bert",
                        extra={"tokenizer": "/some/vocab"})
  loaded, meta = params_io.load_params(tmp_path / "enc", expected_kind="bert")
  assert meta == {"kind": "bert", "config": {"hidden_size": 32}, "tokenizer": "/some/vocab"}
  flat_in, flat_out = params_io.flatten_params(params), params_io.flatten_params(loaded)
  assert list(flat_out) == ["dense/bias", "dense/kernel", "norm/scale"]
  for path, value in flat_in.items():
    assert isinstance(flat_out[path], np.ndarray), path
    assert flat_out[path].dtype == value.dtype, path
    np.testing.assert_array_equal(np.asarray(flat_out[path]), np.asarray(value))


def test_restore_into_sharded_target(tmp_path):
  params = _tree()
  params_io.save_params(tmp_path / "p", params, {}, "vae")
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        params)
  loaded, _ = params_io.load_params(tmp_path / "p", target=target)
  assert loaded["dense"]["kernel"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(loaded["dense"]["kernel"]),
                                params["dense"]["kernel"])


def test_restore_target_mismatch_names_path(tmp_path):
  params = _tree()
  params_io.save_params(tmp_path / "p", params, {}, "unet")
  target = jax.tree.map(lambda x: x, params)
  target["dense"]["kernel"] = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match=r"'dense/kernel'.*\(4, 3\).*\(3, 4\)"):
    params_io.load_params(tmp_path / "p", target=target)


def test_kind_mismatch(tmp_path):
  params_io.save_params(tmp_path / "p", _tree(), {}, "vae")
  with pytest.raises(ValueError, match="holds 'vae' params, expected 'unet'"):
    params_io.load_params(tmp_path / "p", expected_kind="unet")


def test_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="params directory not found"):
    params_io.load_params(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    params_io.load_params(tmp_path / "empty")
  with open(tmp_path / "empty" / "config.json", "w") as f:
    json.dump({"kind": "bert", "config": {}}, f)
  with pytest.raises(FileNotFoundError, match=r"missing params checkpoint.*params"):
    params_io.load_params(tmp_path / "empty")


def test_save_refuses_bad_input_and_existing(tmp_path):
  with pytest.raises(ValueError, match="kind must be one of"):
    params_io.save_params(tmp_path / "a", _tree(), {}, "gpt")
  with pytest.raises(ValueError, match="reserved"):
    params_io.save_params(tmp_path / "a", _tree(), {}, "bert", extra={"kind": "x"})
  with pytest.raises(ValueError, match="JSON"):
    params_io.save_params(tmp_path / "a", _tree(), {"f": object()}, "bert")
  params_io.save_params(tmp_path / "a", _tree(), {}, "bert")
  with pytest.raises(FileExistsError):
    params_io.save_params(tmp_path / "a", _tree(), {}, "bert")
  new = {"w": np.ones((2,), np.float32)}
  params_io.save_params(tmp_path / "a", new, {"v": 2}, "bert", overwrite=True)
  loaded, meta = params_io.load_params(tmp_path / "a")
  assert list(params_io.flatten_params(loaded)) == ["w"] and meta["config"] == {"v": 2}
  assert os.path.isfile(tmp_path / "a" / "config.json")


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t["dense"].pop("bias"), r"missing parameter 'dense/bias' \(expected shape \(4,\)\)"),
    (lambda t: t["norm"].update(bias=np.zeros(5)), r"unexpected parameter 'norm/bias' \(shape"),
    (lambda t: t["dense"].update(kernel=np.zeros((3, 5))),
     r"shape mismatch for parameter 'dense/kernel': expected \(3, 4\), got \(3, 5\)$"),
])
def test_check_params_match_messages(mutate, message):
  expected = _tree()
  loaded = jax.tree.map(lambda x: x, _tree())
  params_io.check_params_match(expected, loaded)  # identical trees pass
  mutate(loaded)
  with pytest.raises(ValueError, match=message):
    params_io.check_params_match(expected, loaded)


def test_check_params_match_reports_first_in_sorted_order_and_count():
  expected = {"a": {"x": np.zeros(2)}, "b": np.zeros(3)}
  loaded = {"a": {"x": np.zeros(1)}, "c": np.zeros(3)}
  with pytest.raises(ValueError, match=r"'a/x'.*and 2 more mismatches"):
    params_io.check_params_match(expected, loaded, what="ckpt")
  # ShapeDtypeStructs (from jax.eval_shape) are valid expected leaves.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), expected)
  params_io.check_params_match(abstract, expected)


def test_unflatten_inverts_flatten():
  tree = _tree()
  assert jax.tree.structure(params_io.unflatten_params(params_io.flatten_params(tree))) == (
      jax.tree.structure(tree))
