"""Bad input, damaged checkpoints and signals: what every command does when things go wrong.

Three parts:
  * the battery: bad flags, configs, paths, images and checkpoints across every command, each
    answered by one `fundax: error: ...` line naming the problem, exit status 2 and no
    traceback (commands run in-process on tiny checkpoints of dummy arrays: nothing compiles);
  * damaged bytes: a garbled array file in a run's latest step is skipped, with a WARNING
    naming the step, by every loader (training, sampling, scoring, evaluation, RLHF);
  * exit codes and edges: a SIGTERMed `fundax train` subprocess exits with the preemption code,
    Ctrl-C in a training loop saves, NaN/inf weights and metrics stop a run, and the feedback
    API answers non-finite JSON numbers with 422.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fundax import checkpoint
from fundax import checksums
from fundax import cli
from fundax import configlib
from fundax import sampling
from fundax.data import tokenizer as tokenizer_lib
from fundax.eval import evaluator as evaluator_lib
from fundax.feedback import app as app_lib
from fundax.interop import params_io
from fundax.models import ldm as ldm_lib
from fundax.models import selector as selector_lib
from fundax.selector import score as score_lib
from fundax.train import loop
from fundax.train import metric_writers
from fundax.trainers import main_job
from fundax.trainers import vae as vae_trainer

import damage
import feedback_helpers
import tiny_ldm


def _save_run(workdir, steps, *, config, state):
  """A run's checkpoints: `state(step)` saved at each step, with `config`."""
  with checkpoint.make_manager(workdir, max_to_keep=None) as manager:
    for step in steps:
      checkpoint.save(manager, step, state(step), config=config, extras={"step": step})
  return workdir


def _ldm_config():
  return {"job": {"data": {"resolution": 32}},
          "models": ldm_lib.models_to_config(tiny_ldm.tiny_models()),
          "tokenizer": tokenizer_lib.tokenizer_reference(), "max_length": tiny_ldm.LENGTH}


def _ldm_state(step):
  """An LDM trainer's checkpoint layout with dummy arrays (loading never checks them against
  the UNet; nothing here samples)."""
  w = step + np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 1e4
  zeros = np.zeros(3, np.float32)
  return {"state": {"params": {"w": w}}, "frozen": {"vae": {"w": zeros}, "text": {"w": zeros}}}


def _step_of(w) -> int:
  """Which step's arrays `w` are (all of it, or -1)."""
  steps = np.unique(np.floor(np.asarray(w)))
  return int(steps[0]) if len(steps) == 1 else -1


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Files and directories of every kind the battery names, built once."""
  root = tmp_path_factory.mktemp("errors")
  paths = {"root": root, "file": root / "a_file.txt", "empty": root / "empty_dir",
           "missing": root / "no_such_thing"}
  paths["file"].write_text("not a directory")
  paths["empty"].mkdir()
  paths["vae_run"] = _save_run(root / "vae_run", [1], config={"job": {}, "models": {"vae": {}}},
                               state=lambda s: {"state": {"params": {"vae": {"w": np.zeros(2)}}}})
  paths["ldm_run"] = _save_run(root / "ldm_run", [1], config=_ldm_config(), state=_ldm_state)
  paths["damaged_run"] = _save_run(root / "damaged_run", [1], config=_ldm_config(),
                                   state=_ldm_state)
  damage.garble(root / "damaged_run" / "checkpoints" / "1")
  images = root / "images"
  images.mkdir()
  Image.new("RGB", (16, 16), (90, 30, 10)).save(images / "good.png")
  (images / "empty.png").write_bytes(b"")
  (images / "garbage.png").write_bytes(b"this is not a PNG file at all" * 10)
  (images / "truncated.png").write_bytes((images / "good.png").read_bytes()[:40])
  (images / "a_dir.png").mkdir()
  paths["images"] = images
  configs = root / "configs"
  configs.mkdir()
  (configs / "syntax.py").write_text("def get_config(arg=None:\n  return 1\n")
  (configs / "no_get_config.py").write_text("X = 1\n")
  (configs / "name_error.py").write_text("def get_config(arg=None):\n  return undefined_name\n")
  paths["configs"] = configs
  run = root / "feedback_run"
  (run / "images").mkdir(parents=True)
  (run / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
  (run / "candidates.jsonl").write_text(json.dumps({"image": "images/bad.png",
                                                    "prompt": "left eye"}) + "\n")
  paths["bad_run"] = run
  (root / "not_a_database.db").write_bytes(b"garbage, not SQLite" * 100)
  return paths


# (argv with {placeholders} from `env`, text the error line must contain). Exit status 2.
# `fundax sample` on the tiny LDM run, valid up to the flag each case adds.
SAMPLE = ["sample", "--checkpoint", "{ldm_run}", "--prompt", "x", "--out", "{root}/g.png"]

BATTERY = [
    # Every command: argument parsing.
    ([], "required: COMMAND"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["train", "nosuchjob", "--workdir", "{root}/w"], "invalid choice: 'nosuchjob'"),
    (["train", "vae"], "--workdir"),
    (["main", "--workdir", "{root}/w", "--config.seed"], "--config.seed needs a value"),
    # Configs: missing, malformed, a bad field.
    (["main", "--workdir", "{root}/w", "--config", "{configs}/missing.py"], "missing.py"),
    (["main", "--workdir", "{root}/w", "--config", "{configs}/syntax.py"], "syntax.py, line 1"),
    (["main", "--workdir", "{root}/w", "--config", "{configs}/no_get_config.py"],
     "no get_config"),
    (["main", "--workdir", "{root}/w", "--config", "{configs}/name_error.py"],
     "NameError: name 'undefined_name'"),
    (["main", "--workdir", "{root}/w", "--config.nope=1"], "no field 'nope'"),
    (["main", "--workdir", "{root}/w", "--config", "main:tiny", "--config.vae_checkpoint=nope"],
     "'nope' is neither a directory nor an autoencoder fundax ships"),
    (["train", "ldm", "--workdir", "{root}/w", "--config", "{configs}/syntax.py"], "syntax.py"),
    (["rlhf", "--workdir", "{root}/w", "--config", "{configs}/name_error.py"], "NameError"),
    (["data", "stats", "--config", "{configs}/syntax.py"], "syntax.py"),
    # Output paths: a file where a directory must go, a directory where a file must go.
    (["main", "--workdir", "{file}"], "is a file, not a directory"),
    (["main", "--workdir", "{file}/sub"], "is a file, so the directory cannot be made"),
    (["train", "vae", "--workdir", "{file}/sub"], "is a file, so the directory cannot be made"),
    (["rlhf", "--workdir", "{file}/sub"], "is a file, so the directory cannot be made"),
    (["sample", "--checkpoint", "{ldm_run}", "--prompt", "x", "--out", "{file}/g.png"],
     "is a file, so the directory cannot be made"),
    (["sample", "--checkpoint", "{ldm_run}", "--prompt", "x", "--out", "{empty}"],
     "must end in .png"),
    (["sample", "--checkpoint", "{ldm_run}", "--prompt", "x", "--out", "{root}/g.jpg"],
     "must end in .png"),
    (["evaluate", "--checkpoint", "{ldm_run}", "--out", "{file}"], "is a file, not a directory"),
    (["data", "preview", "--out", "{root}/grid.txt"], "must end in .png"),
    (["feedback", "export", "--db", "{root}/r.db", "--out", "{file}/x.jsonl"],
     "is a file, so the directory cannot be made"),
    (["feedback", "demo-run", "{file}/run"], "is a file, so the directory cannot be made"),
    (["aot", "--topology", "v5e:2x2", "--out", "{file}/r.json"], "is a file"),
    # Input paths that are missing or of the wrong type.
    (["data", "build", "--manual-dir", "{file}"], "--manual-dir"),
    (["data", "build", "--manual-dir", "{missing}"], "does not exist"),
    (["data", "build", "--data-dir", "{file}"], "--data-dir"),
    (["evaluate", "--checkpoint", "{ldm_run}", "--out", "{root}/ev", "--prompts", "{missing}"],
     "--prompts"),
    (["evaluate", "--checkpoint", "{ldm_run}", "--out", "{root}/ev", "--evaluator",
      "{missing}"], "--evaluator"),
    (["convert", "bert", "{missing}", "{root}/dst"], "does not exist"),
    (["export", "diffusers", "{missing}", "{root}/dst"], "does not exist"),
    # Checkpoints: missing, a file, empty, of the wrong kind, damaged.
    (["sample", "--checkpoint", "{missing}", "--prompt", "x", "--out", "{root}/g.png"],
     "does not exist"),
    (["sample", "--checkpoint", "{file}", "--prompt", "x", "--out", "{root}/g.png"], "is a file"),
    (["sample", "--checkpoint", "{empty}", "--prompt", "x", "--out", "{root}/g.png"],
     "no complete checkpoint step"),
    (["sample", "--checkpoint", "{vae_run}", "--prompt", "x", "--out", "{root}/g.png"],
     "is not an LDM checkpoint"),
    (["sample", "--checkpoint", "{damaged_run}", "--prompt", "x", "--out", "{root}/g.png"],
     "is damaged"),
    (["score", "--checkpoint", "{missing}", "{images}/good.png"], "does not exist"),
    (["score", "--checkpoint", "{empty}", "{images}/good.png"], "no complete checkpoint step"),
    (["score", "--checkpoint", "{ldm_run}", "{images}/good.png"], "is not a Selector checkpoint"),
    (["score", "--checkpoint", "{damaged_run}", "{images}/good.png"], "is damaged"),
    (["evaluate", "--checkpoint", "{empty}", "--out", "{root}/ev"], "no complete checkpoint"),
    (["evaluate", "--checkpoint", "{vae_run}", "--out", "{root}/ev"], "is not an LDM checkpoint"),
    (["evaluate", "--checkpoint", "{damaged_run}", "--out", "{root}/ev"], "is damaged"),
    (["rlhf", "--workdir", "{root}/rl", "--config.ldm_checkpoint={vae_run}",
      "--config.selector_checkpoint={empty}", "--config.evaluator_checkpoint={empty}"],
     "is not an LDM checkpoint"),
    (["rlhf", "--workdir", "{root}/rl", "--config.ldm_checkpoint={damaged_run}",
      "--config.selector_checkpoint={empty}", "--config.evaluator_checkpoint={empty}"],
     "is damaged"),
    # Images given to score.
    (["score", "--checkpoint", "{empty}", "{images}/empty.png"], "cannot read image"),
    (["score", "--checkpoint", "{empty}", "{images}/garbage.png"], "cannot read image"),
    (["score", "--checkpoint", "{empty}", "{images}/truncated.png"], "cannot read image"),
    (["score", "--checkpoint", "{empty}", "{images}/missing.png"], "image not found"),
    (["score", "--checkpoint", "{empty}", "{images}/a_dir.png"], "image not found"),
    (["score", "--checkpoint", "{empty}", "{images}/good.png", "{images}/good.png",
      "{images}/good.png", "--prompt", "a", "--prompt", "b"], "--prompt given 2 times"),
    # Numbers: non-finite, out of range, not numbers.
    (SAMPLE + ["--guidance", "nan"], "--guidance: a finite number is needed"),
    (SAMPLE + ["--guidance", "inf"], "--guidance: a finite number is needed"),
    (SAMPLE + ["--guidance", "1e400"], "--guidance: a finite number is needed"),
    (SAMPLE + ["--eta", "nan"], "--eta: a finite number is needed"),
    (SAMPLE + ["--eta", "-1"], "--eta: must be >= 0"),
    (SAMPLE + ["--num", "0"], "--num: must be >= 1"),
    (SAMPLE + ["--steps", "many"], "--steps: an integer is needed"),
    (SAMPLE + ["--steps", "5000"], "num_steps must be in [1, 1000]"),
    (["score", "--checkpoint", "{empty}", "{images}/good.png", "--threshold", "nan"],
     "--threshold: a finite number is needed"),
    (["score", "--checkpoint", "{empty}", "{images}/good.png", "--threshold=1e999"],
     "--threshold: a finite number is needed"),
    (["evaluate", "--checkpoint", "{ldm_run}", "--out", "{root}/ev", "--guidance-scale=-inf"],
     "--guidance-scale: a finite number is needed"),
    (["evaluate", "--checkpoint", "{ldm_run}", "--out", "{root}/ev", "--num-steps", "0"],
     "--num-steps: must be >= 1"),
    (["evaluate", "--checkpoint", "{ldm_run}", "--out", "{root}/ev", "--num-heldout", "-1"],
     "--num-heldout: must be >= 0"),
    (["data", "preview", "--out", "{root}/g.png", "--num-images", "0"],
     "--num-images: must be >= 1"),
    (["aot", "--topology", "v5e:2x2", "--per-chip-batch", "-2"], "--per-chip-batch"),
    (["feedback", "add-rater", "x", "--db", "{root}/r.db", "--weight", "nan"],
     "--weight: a finite number is needed"),
    (["feedback", "add-rater", "x", "--db", "{root}/r.db", "--weight", "inf"],
     "--weight: a finite number is needed"),
    (["feedback", "add-rater", "x", "--db", "{root}/r.db", "--weight", "-1"],
     "--weight: must be > 0"),
    (["feedback", "add-rater", "x", "--db", "{root}/r.db", "--weight", "0"],
     "--weight: must be > 0"),
    (["feedback", "serve", "--db", "{root}/r.db", "--port", "70000"], "--port: must be <= 65535"),
    (["feedback", "serve", "--db", "{root}/r.db", "--port", "0"], "--port: must be >= 1"),
    (["feedback", "demo-run", "{root}/demo", "--per-prompt", "0"], "--per-prompt: must be >= 1"),
    # The rating database and the importer.
    (["feedback", "simulate", "--db", "{missing}/r.db"], "does not exist: create"),
    (["feedback", "add-rater", "x", "--db", "{empty}"], "is a directory"),
    (["feedback", "simulate", "--db", "{root}/not_a_database.db"],
     "cannot open the rating database"),
    (["feedback", "import", "{missing}", "--db", "{root}/r.db"], "does not exist"),
    (["feedback", "import", "{bad_run}", "--db", "{root}/r2.db"], "bad.png' cannot be decoded"),
    (["feedback", "import", "{bad_run}", "--db", "{root}/r2.db", "--media", "{file}"],
     "--media"),
]


@pytest.mark.parametrize("argv,message", BATTERY,
                         ids=[f"{i:02d}-{' '.join(a[:2])}" for i, (a, _) in enumerate(BATTERY)])
def test_bad_input_is_one_line_exit_2(env, capsys, argv, message):
  names = {k: str(v) for k, v in env.items()}
  rc = cli.main([arg.format(**names) for arg in argv])
  err = capsys.readouterr().err
  assert rc == cli.EXIT_USAGE, err
  assert "Traceback" not in err
  lines = [line for line in err.splitlines() if line.startswith("fundax:")]
  assert len(lines) == 1 and lines[0].startswith("fundax: error: "), err
  assert message in lines[0], lines[0]


def test_debug_shows_the_traceback(env):
  with pytest.raises(ValueError, match="must end in .png"):
    cli.main(["sample", "--checkpoint", str(env["ldm_run"]), "--prompt", "x", "--out",
              str(env["root"] / "g.jpg"), "--debug"])


def test_a_bug_prints_a_traceback_and_exits_1(monkeypatch, capsys):
  def broken(args, overrides):
    raise KeyError("a bug")
  monkeypatch.setattr(cli, "cmd_export", broken)
  assert cli.main(["export", "diffusers", "a", "b"]) == cli.EXIT_FAILED
  err = capsys.readouterr().err
  assert "Traceback" in err and "KeyError: 'a bug'" in err and "internal error" in err


# --- damaged bytes ---


def _selector_run(workdir, steps):
  """A Selector run of the tiny config, one params version per step (no training)."""
  job = configlib.load_config("configs/selector.py:tiny")
  meta = {"job": job.to_dict(), "model": {**job.model.to_dict(), "text_dim": 1},
          "text_encoder": {"spec": "none", "max_length": 8, "dim": 1}}
  model = score_lib.make_model(meta)
  shapes = jax.eval_shape(lambda key: selector_lib.init_params(model, key, job.resolution),
                          jax.random.key(0))
  _save_run(workdir, steps, config=meta, state=lambda s: {"params": jax.tree.map(
      lambda x: np.full(x.shape, s, x.dtype), shapes)})
  return workdir


def test_garbled_latest_step_every_loader_falls_back(tmp_path, caplog):
  """Bytes changed inside an array file of the latest step: Orbax would restore it without a
  complaint; every loader skips it for step 1, with a WARNING naming step 2."""
  ldm_run = _save_run(tmp_path / "ldm", [1, 2], config=_ldm_config(), state=_ldm_state)
  selector_run = _selector_run(tmp_path / "selector", [1, 2])
  damaged = {}
  for run in (ldm_run, selector_run):
    damaged[run] = f"checkpoint step {run / 'checkpoints' / '2'} is damaged"
    damage.garble(run / "checkpoints" / "2")

  loaders = {  # what each command reads a checkpoint with
      "restore_params (Python API, export)": lambda: checkpoint.restore_params(ldm_run)[
          "state"]["params"]["w"],
      "load_pipeline (sample, evaluate, rlhf)": lambda: sampling.load_pipeline(ldm_run).params[
          "unet"]["w"],
      "load_selector (score, rlhf, evaluate --selector)": lambda: jax.tree.leaves(
          score_lib.load_selector(selector_run)[1])[0],
  }
  for name, load in loaders.items():
    caplog.clear()
    with caplog.at_level("WARNING"):
      value = load()
    assert _step_of(value) == 1, name  # step 1's arrays
    run = selector_run if "selector" in name else ldm_run
    assert damaged[run] in caplog.text, name

  # Training (and RLHF) resume with `restore_or_init`: it also moves the damaged step aside,
  # so that the resumed run writes step 2 again.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _ldm_state(0))
  caplog.clear()
  with caplog.at_level("WARNING"), checkpoint.make_manager(ldm_run) as manager:
    state, extras, source = checkpoint.restore_or_init(manager, abstract, init_fn=None)
    assert (source, extras["step"], _step_of(state["state"]["params"]["w"])) == ("workdir", 1, 1)
    assert damaged[ldm_run] in caplog.text
    assert manager.all_steps() == [1]
    assert checkpoint.save(manager, 2, _ldm_state(2), config=_ldm_config(), extras={"step": 2})
  assert (tmp_path / "ldm" / "checkpoints_damaged" / "2").is_dir()
  caplog.clear()
  with caplog.at_level("WARNING"):
    assert _step_of(checkpoint.restore_params(ldm_run)["state"]["params"]["w"]) == 2
  assert "damaged" not in caplog.text and "unverified" not in caplog.text


def test_damaged_params_directory_is_named(tmp_path):
  directory = tmp_path / "evaluator"
  params_io.save_params(directory, {"w": np.arange(64, dtype=np.float32)}, {}, "evaluator")
  assert params_io.load_params(directory)[0]["w"][3] == 3
  files = [p for p in (directory / "params").rglob("*") if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  data[len(data) // 2] ^= 0xFF
  largest.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=f"params directory {directory} is damaged"):
    params_io.load_params(directory)


def test_steps_without_checksums_load_with_a_warning(tmp_path, caplog):
  run = _save_run(tmp_path, [1], config=_ldm_config(), state=_ldm_state)
  (run / "checkpoints" / "1" / checksums.FILE).unlink()  # as fundax wrote them before
  with caplog.at_level("WARNING"):
    assert _step_of(checkpoint.restore_params(run)["state"]["params"]["w"]) == 1
  assert f"checkpoint step {run / 'checkpoints' / '1'} has no checksums" in caplog.text
  assert "unverified" in caplog.text
  # Why they are needed: garbled bytes restore without an error, as wrong values.
  damage.garble(run / "checkpoints" / "1")
  w = checkpoint.restore_params(run)["state"]["params"]["w"]
  assert not np.array_equal(w, _ldm_state(1)["state"]["params"]["w"])


def test_shipped_evaluator_is_verified(caplog):
  shipped = sorted(pathlib.Path(evaluator_lib.__file__).parent.glob("evaluators/*/evaluator"))
  assert shipped
  with caplog.at_level("WARNING"):
    for directory in shipped:
      evaluator_lib.load_evaluator(directory)
  assert "unverified" not in caplog.text


def test_shipped_autoencoders_are_verified(caplog):
  assert ldm_lib.shipped_vaes()
  with caplog.at_level("WARNING"):
    for name in ldm_lib.shipped_vaes():
      ldm_lib.load_vae(name)
  assert "unverified" not in caplog.text


# --- exit codes and the feedback API ---


def test_sigterm_during_training_exits_with_the_preemption_code(tmp_path):
  """`fundax train vae` in a subprocess (a one-level 16 px VAE on one device: the compile takes
  seconds), SIGTERMed once its loop runs: it saves and exits 75."""
  workdir = tmp_path / "vae"
  argv = [sys.executable, "-m", "fundax.cli", "train", "vae", "--config", "configs/vae.py:tiny",
          "--workdir", str(workdir), "--config.num_steps=500", "--config.eval_every=0",
          "--config.sample_every=0", "--config.checkpoint_every=500", "--config.resolution=16",
          "--config.model.block_out_channels=(8,)", "--config.model.norm_num_groups=4",
          "--config.train.adv_weight=0.0", "--config.train.ssim_weight=0.0",
          "--config.data.num_train=8", "--config.data.num_validation=8",
          "--config.data.num_test=8"]
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=pathlib.Path(__file__).parent.parent,
                          env={**os.environ, "XLA_FLAGS": " ".join(flags)})
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while not (metrics.is_file() and metrics.read_text().strip()):  # the loop is running
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == cli.EXIT_PREEMPTED, err
  assert "Traceback" not in err
  assert "fundax: preempted by SIGTERM" in err and "rerun the same command" in err
  assert "preempted (SIGTERM) at step" in out
  steps = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and (steps[0] / checksums.FILE).is_file()  # saved before exiting


class FakeState:
  """A train state for the loop without compiling anything: a step and params on the host."""

  def __init__(self, step, params):
    self.step, self.params, self.ema_params = step, params, None


def _fake_loop(tmp_path, *, hooks=(), params=np.zeros(2, np.float32), num_steps=4):
  saved = []
  with metric_writers.MetricWriter(tmp_path) as writer:
    result = loop.train_loop(
        FakeState(0, params), step_fn=lambda state, batch, rng: (
            FakeState(state.step + 1, state.params), {"loss": 1.0}),
        batches=iter(lambda: {"x": 0}, None), batch_keys=("x",), rng=None,
        num_steps=num_steps, writer=writer, log_every=1, checkpoint_every=100,
        save=lambda step, state: saved.append(step), hooks=hooks)
  return result, saved


def test_ctrl_c_in_the_loop_saves_and_a_second_one_stops_at_once(tmp_path):
  def ctrl_c(step, state):
    del state
    if step == 1:
      os.kill(os.getpid(), signal.SIGINT)
  result, saved = _fake_loop(tmp_path / "a", hooks=[loop.Hook(1, ctrl_c)])
  assert result.preempted == "SIGINT" and saved == [2]  # finished step 2, saved it, returned

  def two(step, state):
    del state
    if step == 1:
      os.kill(os.getpid(), signal.SIGINT)
      os.kill(os.getpid(), signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    _fake_loop(tmp_path / "b", hooks=[loop.Hook(1, two)])


def test_non_finite_weights_are_not_saved(tmp_path):
  with pytest.raises(loop.NonFiniteWeightsError,
                     match="params at step 4 hold NaN/inf values; not saved"):
    _fake_loop(tmp_path, params=np.array([0.0, np.nan], np.float32))


def test_non_finite_evaluation_stops_the_run():
  batches = [{"valid": np.ones(2)}, {"valid": np.ones(2)}]
  metrics = iter([{"count": 2.0, "loss": 0.5}, {"count": 2.0, "loss": float("inf")}])
  with pytest.raises(loop.NonFiniteMetricError, match=r"\['loss'\] are NaN/inf"):
    loop.evaluate(lambda batch: next(metrics), iter(batches), ())


@pytest.mark.parametrize("command,result,status,line", [
    ("train", {"workdir": "w", "unfinished": "preempted (SIGTERM) at step 2 of 4, saved",
               "preempted": "SIGTERM"}, cli.EXIT_PREEMPTED, "fundax: preempted by SIGTERM"),
    ("main", {"summary": "s", "stopped": "stage vae unfinished", "preempted": "SIGINT"},
     cli.EXIT_PREEMPTED, "fundax: preempted by SIGINT"),
    ("main", {"summary": "s", "stopped": "stage vae unfinished: stopped at step 2 of 4 "
              "(stop_at_step)"}, 0, None),
    ("train", loop.NonFiniteLossError("3 consecutive steps"), cli.EXIT_FAILED,
     "fundax: stopped: 3 consecutive steps"),
    ("main", KeyboardInterrupt(), cli.EXIT_INTERRUPTED, "fundax: interrupted (Ctrl-C)"),
    ("main", "sigterm", cli.EXIT_PREEMPTED, "fundax: preempted by SIGTERM"),
])
def test_exit_codes(tmp_path, monkeypatch, capsys, command, result, status, line):
  """How a run ended, as `fundax train` and `fundax main` report it (the jobs stubbed)."""
  def run(config, workdir):
    del config, workdir
    if isinstance(result, BaseException):
      raise result
    if result == "sigterm":  # outside a training loop: the CLI's own handler
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)
    return dict(result)
  monkeypatch.setattr(vae_trainer, "run", run)
  monkeypatch.setattr(main_job, "run", run)
  argv = ["train", "vae"] if command == "train" else ["main"]
  assert cli.main(argv + ["--workdir", str(tmp_path / "w")]) == status
  err = capsys.readouterr().err
  assert "Traceback" not in err
  assert [l for l in err.splitlines() if l.startswith("fundax:")] == (
      [] if line is None else [next(l for l in err.splitlines() if l.startswith(line))])


@pytest.mark.parametrize("argv,module,function", [
    (["train", "selector"], "fundax.selector.train", "train_selector"),
    (["train", "evaluator"], "fundax.eval.evaluator_train", "train_evaluator"),
    (["rlhf"], "fundax.rl.rounds", "run"),
], ids=["selector", "evaluator", "rlhf"])
def test_every_trainer_passes_its_preemption_on(tmp_path, monkeypatch, capsys, argv, module,
                                                function):
  """`fundax train selector|evaluator` and `fundax rlhf` exit 75 when their job was preempted
  (the jobs stubbed; their own SIGTERM tests are in test_selector_train.py,
  test_eval_evaluator.py and test_rl_loop.py)."""
  import importlib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(importlib.import_module(module), function, lambda config, workdir: {
      "workdir": workdir, "unfinished": "preempted (SIGTERM) at step 3 of 9, saved",
      "preempted": "SIGTERM"})
  assert cli.main(argv + ["--workdir", str(tmp_path / "w")]) == cli.EXIT_PREEMPTED
  out, err = capsys.readouterr()
  assert "unfinished: preempted (SIGTERM) at step 3" in out
  assert "fundax: preempted by SIGTERM" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def api(tmp_path_factory):
  store, _ = feedback_helpers.make_store(tmp_path_factory.mktemp("api"), num_prompts=1,
                                         per_prompt=2)
  _, token = store.create_rater("boss", is_admin=True)
  client = TestClient(app_lib.create_app(store), raise_server_exceptions=False)
  return client, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


@pytest.mark.parametrize("route,body", [
    ("/api/admin/raters", '{"name": "a", "weight": NaN}'),
    ("/api/admin/raters", '{"name": "b", "weight": Infinity}'),
    ("/api/admin/raters", '{"name": "c", "weight": -Infinity}'),
    ("/api/admin/raters", '{"name": "d", "weight": 1e400}'),
    ("/api/ratings", '{"request_id": "r1", "candidate_id": NaN}'),
    ("/api/ratings", '{"request_id": "r2", "candidate_id": 1, "score": Infinity}'),
    ("/api/ratings", '{"request_id": "r3", "candidate_id": 1e400}'),
    ("/api/pairwise", '{"request_id": "p1", "candidate_a": NaN, "candidate_b": 2, '
                      '"preferred": "a"}'),
    ("/api/pairwise", '{"request_id": "p2", "candidate_a": 1, "candidate_b": -1e400, '
                      '"preferred": "a"}'),
])
def test_api_non_finite_numbers_are_422(api, route, body):
  client, headers = api
  r = client.post(route, content=body, headers=headers)
  assert r.status_code == 422, r.text
  assert r.json()["detail"][0]["loc"][0] == "body"


def test_store_refuses_bad_rater_weights(tmp_path):
  store = feedback_helpers.store_lib.Store(str(tmp_path / "r.db"))
  for weight in (float("nan"), float("inf"), 0.0, -1.0, 1e9, True):
    with pytest.raises(feedback_helpers.store_lib.StoreError, match="rater weight"):
      store.create_rater(f"r{weight}", weight=weight)
  with pytest.raises(ValueError, match="port must be an integer in 1-65535"):
    app_lib.serve(str(tmp_path / "r.db"), port=70000)
