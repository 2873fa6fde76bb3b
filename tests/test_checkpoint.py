"""Tests for fundax.checkpoint: resume determinism, target shardings, resume order, keep-N,
checksums and the fallback from damaged steps."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import damage
import toy_model
from fundax import checkpoint, checksums, parallel
from fundax.interop import params_io

STEP_RNG_SEED = 1
CONFIG = {"model": {"kind": "mlp", "hidden": toy_model.HIDDEN},
          "tokenizer": {"name": "all-minilm-l6-v2"}, "optim": toy_model.OPTIM,
          "mesh": {"data": 2, "fsdp": 4}, "shape": (1, 2)}


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh({"data": 2, "fsdp": 4})


@pytest.fixture(scope="module")
def trainer(mesh):
  return toy_model.make_trainer(mesh)


def _train(state, step_fn, mesh, start, stop):
  rng = jax.random.key(STEP_RNG_SEED)
  losses = []
  for i in range(start, stop):
    batch = parallel.host_local_to_global(toy_model.global_batch(i), mesh)
    state, metrics = step_fn(state, batch, rng)
    losses.append(float(metrics["loss"]))
  return state, losses


def _restore(workdir, abstract, init, **kwargs):
  with checkpoint.make_manager(workdir) as manager:
    return checkpoint.restore_or_init(manager, abstract, init, **kwargs)


def _save(workdir, state, *, step=None, extras=None, **kwargs):
  with checkpoint.make_manager(workdir, **kwargs) as manager:
    assert checkpoint.save(manager, int(state.step) if step is None else step, state,
                           config=CONFIG, extras=extras or {})
    checkpoint.wait(manager)


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_resume_is_deterministic(tmp_path, mesh, trainer):
  abstract, init, step = trainer
  straight, straight_losses = _train(init(), step, mesh, 0, 4)

  state, source = init(), None
  state, losses = _train(state, step, mesh, 0, 2)
  _save(tmp_path, state, extras={"data": {"next_batch": 2}})
  del state
  state, extras, source = _restore(tmp_path, abstract, init)  # a fresh manager, as on restart
  assert source == "workdir" and int(state.step) == 2
  state, more = _train(state, step, mesh, extras["data"]["next_batch"], 4)
  assert losses + more == straight_losses
  assert_trees_equal(state, straight)


def test_restore_into_target_shardings(tmp_path, trainer):
  # Saved from a data-parallel run (all replicated), restored into fsdp shardings.
  abstract, _, _ = trainer
  dp_mesh = parallel.make_mesh({"data": 8})
  _, dp_init, _ = toy_model.make_trainer(dp_mesh)
  saved = dp_init()
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(saved))
  _save(tmp_path, saved)
  state, _, source = _restore(tmp_path, abstract, dp_init)
  assert source == "workdir"
  jax.tree.map(lambda x, a: _assert_sharding(x, a.sharding), state, abstract)
  assert state.params["Dense_1"]["kernel"].sharding.spec == P(None, "fsdp")
  assert state.ema_params is not None
  assert_trees_equal(state, saved)


def _assert_sharding(x, expected):
  assert x.sharding == expected


def test_config_and_extras_round_trip(tmp_path, trainer):
  _, init, _ = trainer
  extras = {"data": {"position": 17, "epoch": 1}, "tracker": {"prompt a": [0.5, 1.5]}}
  _save(tmp_path, init(), step=3, extras=extras)
  expected = json.loads(json.dumps(CONFIG))  # tuples come back as lists
  ckpt_dir = os.path.join(tmp_path, "checkpoints")
  for path in (tmp_path, ckpt_dir, os.path.join(ckpt_dir, "3")):
    assert checkpoint.load_config(path) == expected
  # The config is readable without the arrays.
  shutil.rmtree(os.path.join(ckpt_dir, "3", "state"))
  assert checkpoint.load_config(tmp_path) == expected
  with checkpoint.make_manager(tmp_path) as manager:
    with pytest.raises(ValueError, match="extras is not JSON-serialisable"):
      checkpoint.save(manager, 4, init(), config=CONFIG, extras={"x": object()})


def test_extras_come_back(tmp_path, trainer):
  abstract, init, _ = trainer
  extras = {"data": {"position": 17}, "tracker": {"prompt a": [0.5, 1.5]}}
  _save(tmp_path, init(), extras=extras)
  _, restored, _ = _restore(tmp_path, abstract, init)
  assert restored == extras


def _pretrained():
  return jax.device_get(toy_model.init_params(jax.random.key(42)))


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
  """Stands in for converted pretrained weights: a params_io directory."""
  directory = tmp_path_factory.mktemp("pretrained") / "unet"
  params_io.save_params(directory, _pretrained(), {"hidden": toy_model.HIDDEN}, "unet")
  return directory


def test_resume_order(tmp_path, mesh, trainer, pretrained_dir):
  abstract, init, step = trainer

  def params_init():
    return params_io.load_params(pretrained_dir, "unet")[0]

  other = tmp_path / "other"
  trained, _ = _train(init(), step, mesh, 0, 2)
  _save(other, trained)

  # (4) nothing: scratch.
  state, extras, source = _restore(tmp_path / "scratch", abstract, init)
  assert (source, extras, int(state.step)) == ("scratch", {}, 0)
  assert_trees_equal(state, init())

  # (3) params-only: the given params, fresh optimizer, target shardings.
  state, extras, source = _restore(tmp_path / "params", abstract, init, params_init=params_init)
  assert (source, extras, int(state.step)) == ("params", {}, 0)
  assert_trees_equal(state.params, _pretrained())
  assert_trees_equal(state.ema_params, _pretrained())
  assert_trees_equal(state.opt_state, init().opt_state)
  jax.tree.map(lambda x, a: _assert_sharding(x, a.sharding), state, abstract)

  # (2) a resume path beats params-only init.
  run = tmp_path / "run"
  state, _, source = _restore(run, abstract, init, resume_path=other, params_init=params_init)
  assert source == "resume" and int(state.step) == 2
  assert_trees_equal(state, trained)

  # (1) the run's own checkpoint beats the resume path.
  state, _ = _train(state, step, mesh, 2, 3)
  _save(run, state)
  state, _, source = _restore(run, abstract, init, resume_path=other, params_init=params_init)
  assert source == "workdir" and int(state.step) == 3


def test_resume_path_forms(tmp_path, trainer):
  abstract, init, _ = trainer
  _save(tmp_path / "other", init(), step=5)
  _save(tmp_path / "other", init(), step=7)
  for path, expected_step in ((tmp_path / "other", 7),
                              (tmp_path / "other" / "checkpoints", 7),
                              (tmp_path / "other" / "checkpoints" / "5", 5)):
    with checkpoint.make_manager(tmp_path / "run") as manager:
      state, _, source = checkpoint.restore_or_init(manager, abstract, init, resume_path=path)
    assert source == "resume"
    assert manager.latest_step() is None  # nothing written to the run


def test_bad_resume_path_is_named(tmp_path, trainer):
  abstract, init, _ = trainer
  missing = tmp_path / "no_such_run"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    _restore(tmp_path / "run", abstract, init, resume_path=missing)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(checkpoint.CheckpointError, match=f"no complete checkpoint step in {empty}"):
    _restore(tmp_path / "run", abstract, init, resume_path=empty)


def test_params_init_mismatch_is_named(tmp_path, trainer):
  abstract, init, _ = trainer

  def wrong():
    params = _pretrained()
    params["Dense_1"]["kernel"] = np.zeros((64, 3), np.float32)
    return params

  with pytest.raises(ValueError, match=r"'Dense_1/kernel'.*\(64, 64\), got \(64, 3\)"):
    _restore(tmp_path, abstract, init, params_init=wrong)


def test_keep_n_and_save_interval(tmp_path, trainer):
  _, init, _ = trainer
  state = init()
  with checkpoint.make_manager(tmp_path / "a", max_to_keep=2) as manager:
    for step in range(1, 6):
      assert checkpoint.save(manager, step, state, config=CONFIG, extras={})
    checkpoint.wait(manager)
    assert manager.all_steps() == [4, 5]
  assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == ["4", "5"]
  with checkpoint.make_manager(tmp_path / "b", save_interval_steps=2) as manager:
    saved = [checkpoint.save(manager, step, state, config=CONFIG, extras={})
             for step in range(1, 6)]
    checkpoint.wait(manager)
    # Orbax always writes the first save of a manager, then multiples of the interval.
    assert saved == [True, True, False, True, False]
    assert manager.all_steps() == [1, 2, 4]


def test_damaged_latest_step_falls_back_with_warning(tmp_path, trainer, caplog):
  abstract, init, _ = trainer
  _save(tmp_path, init(), step=1, extras={"step": 1})
  _save(tmp_path, init(), step=2, extras={"step": 2})
  ckpt_dir = tmp_path / "checkpoints"
  damage.overwrite(ckpt_dir / "2")
  with caplog.at_level("WARNING"):
    _, extras, source = _restore(tmp_path, abstract, init)
  assert source == "workdir" and extras["step"] == 1  # step 1's extras: the fallback
  assert f"checkpoint step {ckpt_dir / '2'} is damaged" in caplog.text
  # The resumed run set the damaged step aside, so that it writes step 2 anew.
  assert sorted(os.listdir(ckpt_dir)) == ["1"]
  assert (tmp_path / checkpoint.DAMAGED_SUBDIR / "2" / "state").is_dir()
  # With every step damaged, the error names them.
  damage.overwrite(ckpt_dir / "1")
  with pytest.raises(checkpoint.CheckpointError, match=f"step {ckpt_dir / '1'}"):
    _restore(tmp_path, abstract, init)


def test_damaged_step_is_named_incomplete_is_ignored(tmp_path, trainer):
  abstract, init, _ = trainer
  _save(tmp_path, init(), step=2)
  ckpt_dir = tmp_path / "checkpoints"
  # An interrupted save leaves a temporary directory, which is not a step.
  shutil.copytree(ckpt_dir / "2", ckpt_dir / "3.orbax-checkpoint-tmp-1234")
  shutil.rmtree(ckpt_dir / "3.orbax-checkpoint-tmp-1234" / "state" / "d")
  state, _, source = _restore(tmp_path, abstract, init)
  assert source == "workdir"
  # A complete-looking step with damaged array data (and no older step) is an error naming
  # the step directory.
  damage.overwrite(ckpt_dir / "2")
  with pytest.raises(checkpoint.CheckpointError, match=f"step {ckpt_dir / '2'}"):
    _restore(tmp_path, abstract, init)


def test_restore_params_for_sampling(tmp_path, trainer):
  _, init, _ = trainer
  state = init()
  frozen = {"vae": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "text": {"emb": np.ones((4, 2), np.float32)}}
  with checkpoint.make_manager(tmp_path) as manager:
    checkpoint.save(manager, 1, state, config=CONFIG, extras={}, frozen=frozen)
    checkpoint.save(manager, 2, state.replace(ema_params=None), config={"v": 2}, extras={})
    checkpoint.wait(manager)
  restored = checkpoint.restore_params(tmp_path, step=1)
  assert restored["step"] == 1
  assert all(isinstance(x, np.ndarray)
             for x in jax.tree.leaves((restored["state"], restored["frozen"])))
  assert_trees_equal(restored["state"]["params"], state.params)
  assert_trees_equal(restored["state"]["ema_params"], state.ema_params)
  assert_trees_equal(restored["frozen"], frozen)
  latest = checkpoint.restore_params(tmp_path / "checkpoints")
  assert latest["step"] == 2 and latest["frozen"] is None
  assert latest["state"]["ema_params"] is None
  assert checkpoint.load_config(tmp_path, step=2) == {"v": 2}
  with pytest.raises(checkpoint.CheckpointError, match=r"no complete checkpoint step 3 .*\[1, 2\]"):
    checkpoint.restore_params(tmp_path, step=3)


def test_changed_model_is_named_not_damage(tmp_path, trainer):
  abstract, init, _ = trainer
  _save(tmp_path, init(), step=1)

  def widen(path, x):
    if parallel.path_str(path).endswith("Dense_2/kernel"):
      return jax.ShapeDtypeStruct((x.shape[0], 2), x.dtype, sharding=x.sharding)
    return x

  wider = jax.tree_util.tree_map_with_path(widen, abstract)
  # params, ema_params and both Adam moments: 4 mismatches, the first named in full.
  with pytest.raises(ValueError, match=r"checkpoints/1 do not match.*'ema_params/Dense_2/kernel': "
                                       r"expected \(64, 2\), got \(64, 1\) \(and 3 more"):
    _restore(tmp_path, wider, init)


def test_every_step_records_its_checksums(tmp_path, trainer):
  _, init, _ = trainer
  frozen = {"vae": {"w": np.ones((4, 2), np.float32)}}
  with checkpoint.make_manager(tmp_path) as manager:
    checkpoint.save(manager, 1, init(), config=CONFIG, extras={}, frozen=frozen)
  step_dir = tmp_path / "checkpoints" / "1"
  record = json.loads((step_dir / checksums.FILE).read_text())
  assert set(record["items"]) == {"state", "config", "extras", "frozen"}
  assert all(record["items"]["state"].values())
  assert checksums.verify(step_dir, checkpoint.ITEMS)
  # No temporary file is left behind: the record was written before Orbax's rename.
  assert not list(tmp_path.rglob("*.tmp")) and sorted(os.listdir(step_dir.parent)) == ["1"]


def test_resumed_run_replaces_a_garbled_step(tmp_path, mesh, trainer, caplog):
  """Bytes changed inside an array file (same size, intact metadata): the resume falls back to
  step 1 with a WARNING naming step 2, and the rerun writes step 2 again, identical to the
  straight run's."""
  abstract, init, step = trainer
  state, _ = _train(init(), step, mesh, 0, 1)
  _save(tmp_path, state, extras={"next": 1})
  straight, _ = _train(state, step, mesh, 1, 2)
  _save(tmp_path, straight, extras={"next": 2})
  ckpt_dir = tmp_path / "checkpoints"
  damage.garble(ckpt_dir / "2")
  with caplog.at_level("WARNING"):
    state, extras, source = _restore(tmp_path, abstract, init)
  assert (source, int(state.step), extras["next"]) == ("workdir", 1, 1)
  assert f"checkpoint step {ckpt_dir / '2'} is damaged" in caplog.text
  assert "differs from its recorded checksum" in caplog.text
  resumed, _ = _train(state, step, mesh, extras["next"], 2)
  _save(tmp_path, resumed, extras={"next": 2})  # asserts that the save happened
  assert_trees_equal(resumed, straight)
  caplog.clear()
  with caplog.at_level("WARNING"):
    state, extras, _ = _restore(tmp_path, abstract, init)
  assert int(state.step) == 2 and extras["next"] == 2 and "damaged" not in caplog.text
  assert sorted(os.listdir(tmp_path / checkpoint.DAMAGED_SUBDIR)) == ["2"]
