"""Tests for the sharding rules, sharded init and the jitted step of fundax.parallel."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import toy_model
from fundax import parallel

STEPS = 3


def _run(mesh, steps=STEPS):
  abstract, init, step = toy_model.make_trainer(mesh)
  state = init()
  losses = []
  rng = jax.random.key(1)
  for i in range(steps):
    state, metrics = step(state, parallel.host_local_to_global(toy_model.global_batch(i), mesh),
                          rng)
    losses.append(float(metrics["loss"]))
  return abstract, state, np.array(losses)


@pytest.fixture(scope="module")
def reference():
  """The same training on one device."""
  mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  _, state, losses = _run(mesh)
  return jax.device_get(state), losses


def _shard_slices(array):
  return {tuple((s.start, s.stop) for s in shard.index) for shard in array.addressable_shards}


@pytest.mark.parametrize("mesh_config", [{"data": 8}, {"data": 2, "fsdp": 4}])
def test_sharded_step_matches_single_device(mesh_config, reference):
  ref_state, ref_losses = reference
  mesh = parallel.make_mesh(mesh_config)
  abstract, state, losses = _run(mesh)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(state), ref_state)
  assert int(state.step) == STEPS
  # Every leaf of the output state keeps the sharding the rules gave it.
  jax.tree.map(lambda x, a: assert_sharding(x, a.sharding), state, abstract)
  kernel = state.params["Dense_1"]["kernel"]
  if "fsdp" in mesh.axis_names:
    assert kernel.sharding.spec == P(None, "fsdp")
    assert len(_shard_slices(kernel)) == 4  # really split in 4, not replicated
    assert state.opt_state[1][0].mu["Dense_1"]["kernel"].sharding == kernel.sharding
    assert state.ema_params["Dense_1"]["kernel"].sharding == kernel.sharding
  else:
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))


def assert_sharding(x, expected):
  assert x.sharding == expected, (x.sharding, expected)


def test_params_created_sharded():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  rules = [("Dense_0/kernel", ("fsdp", None)), ("kernel", "fsdp")]
  params = parallel.init_sharded(toy_model.init_params, jax.random.key(0), mesh, rules,
                                 fsdp_min_size=toy_model.FSDP_MIN_SIZE)
  expected = parallel.param_shardings(jax.eval_shape(toy_model.init_params, jax.random.key(0)),
                                      mesh, rules, fsdp_min_size=toy_model.FSDP_MIN_SIZE)
  jax.tree.map(assert_sharding, params, expected)
  assert params["Dense_0"]["kernel"].sharding.spec == P("fsdp", None)
  assert params["Dense_1"]["kernel"].sharding.spec == P(None, "fsdp")
  assert params["Dense_0"]["bias"].sharding.is_fully_replicated  # no rule matches
  # Same values as an unsharded init compiled alike: sharding changes placement, not numbers.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
               jax.device_get(parallel.jit_once(toy_model.init_params)(jax.random.key(0))))


def test_donation_and_single_trace():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  traces = []

  def counting_step(state, batch, rng):
    traces.append(1)
    return toy_model.train_step(state, batch, rng)

  abstract, init, _ = toy_model.make_trainer(mesh)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  step = parallel.jit_step(counting_step, shardings, parallel.batch_sharding(mesh))
  state = init()
  rng = jax.random.key(1)
  for i in range(3):
    old = state
    state, _ = step(state, parallel.host_local_to_global(toy_model.global_batch(i), mesh), rng)
    assert all(x.is_deleted() for x in jax.tree.leaves(old))  # donated
    assert not any(x.is_deleted() for x in jax.tree.leaves(state))
  assert len(traces) == 1
  assert int(state.step) == 3


@pytest.fixture
def mesh24():
  return parallel.make_mesh({"data": 2, "fsdp": 4})


def test_rules_first_match_wins(mesh24):
  abstract = {"enc": {"kernel": jax.ShapeDtypeStruct((8, 32), np.float32),
                      "bias": jax.ShapeDtypeStruct((32,), np.float32)},
              "dec": {"kernel": jax.ShapeDtypeStruct((32, 8), np.float32)}}
  rules = [("^enc/kernel$", (None, "fsdp")),
           ("kernel", ("fsdp",)),         # shorter than the shape: trailing dims replicated
           ("enc", ("data",))]            # would match enc/kernel too, but comes later
  specs = jax.tree.map(lambda s: s.spec, parallel.param_shardings(abstract, mesh24, rules))
  assert specs == {"enc": {"kernel": P(None, "fsdp"), "bias": P("data")},
                   "dec": {"kernel": P("fsdp")}}
  # No rules at all: everything replicated. None: the default fsdp tactic.
  assert all(s.is_fully_replicated
             for s in jax.tree.leaves(parallel.param_shardings(abstract, mesh24, [])))
  default = parallel.param_shardings(abstract, mesh24, None, fsdp_min_size=64)
  assert default["dec"]["kernel"].spec == P("fsdp", None)


def test_rules_from_config_lists(mesh24):
  # ConfigDicts and JSON hold specs as lists, with lists for several axes on one dim.
  spec = parallel.spec_for("a/kernel", (8, 16), mesh24, [["kernel", [["data", "fsdp"], None]]])
  assert spec == P(("data", "fsdp"), None)


@pytest.mark.parametrize("shape, axes, min_size, expected", [
    ((16, 64), {"data": 2, "fsdp": 4}, 256, P(None, "fsdp")),   # largest dim
    ((64, 16), {"data": 2, "fsdp": 4}, 256, P("fsdp", None)),
    ((3, 3, 32, 32), {"data": 2, "fsdp": 4}, 256, P(None, None, None, "fsdp")),  # tie: last
    ((128, 6), {"data": 2, "fsdp": 4}, 256, P("fsdp", None)),
    ((6, 100), {"data": 2, "fsdp": 4}, 256, P(None, "fsdp")),  # 100 divisible, 6 not
    ((6, 102), {"data": 2, "fsdp": 4}, 256, P()),               # nothing divisible
    ((16, 8), {"data": 2, "fsdp": 4}, 256, P()),                # below the size threshold
    ((16, 64), {"data": 8}, 256, P()),                          # no fsdp axis
])
def test_fsdp_tactic(shape, axes, min_size, expected):
  mesh = parallel.make_mesh(axes)
  assert parallel.fsdp_spec(shape, mesh, min_size=min_size) == expected
  assert parallel.spec_for("x/kernel", shape, mesh, [("kernel", "fsdp")],
                           fsdp_min_size=min_size) == expected


@pytest.mark.parametrize("spec, match", [
    (("fsdp", None), r"'dec/kernel'.*size 10 is not divisible.*4 devices"),
    ((None, None, "fsdp"), r"'dec/kernel'.*more entries"),
    (("tensor", None), r"'dec/kernel'.*\['tensor'\].*not in the mesh"),
    ("shard_everything", r"'dec/kernel'.*unknown tactic"),
])
def test_bad_rule_names_param(mesh24, spec, match):
  abstract = {"dec": {"kernel": jax.ShapeDtypeStruct((10, 64), np.float32)}}
  with pytest.raises(ValueError, match=match):
    parallel.param_shardings(abstract, mesh24, [("kernel", spec)])


def test_state_shardings_follow_params(mesh24):
  abstract = jax.eval_shape(toy_model.init_state, jax.random.key(0))
  shardings = parallel.state_shardings(abstract, mesh24, fsdp_min_size=toy_model.FSDP_MIN_SIZE)
  flat = {parallel.path_str(p): s
          for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  kernel = flat["params/Dense_1/kernel"]
  assert kernel.spec == P(None, "fsdp")
  for name in ("opt_state/1/0/mu/Dense_1/kernel", "opt_state/1/0/nu/Dense_1/kernel",
               "ema_params/Dense_1/kernel"):
    assert flat[name] == kernel, name
  assert flat["step"] == NamedSharding(mesh24, P())
  assert flat["opt_state/1/0/count"] == NamedSharding(mesh24, P())
