"""Training the independent evaluator on phantom images, and the generic multi-head fit loop.

`train_evaluator(config, workdir)` draws its own phantom images (seeds from
`config.data.first_seed`, a range used by no other fundax job: not by the Selector, which
learns from human ratings and its own phantom seeds, nor by the phantom dataset the generator
learns from), trains `evaluator.FundusEvaluator` with one loss per head, resumes from
`workdir/checkpoints`, logs metrics (`metrics.jsonl` and `tensorboard/`) and writes the params
directory `workdir/evaluator` plus held-out phantom scores per attribute (accuracy beside the
majority-class rate, QWK, AUROC). Its steps run in the shared `fundax.train.loop.train_loop`:
a NaN/inf step is skipped (too many in a row stop the run), and SIGTERM or Ctrl-C saves the
current step and returns "preempted" without the params directory or held-out scores, which
only a finished run writes; the rerun resumes with the batches an uninterrupted run draws.

Lesion grades are learnt only with help: most phantom eyes are healthy, so a plain
cross-entropy head settles on "healthy" (the majority rate) before it sees a lesion. Three
things counter that: balanced draws (each grade pinned to a uniform value half of the time),
inverse-frequency class weights in the loss (`balanced_class_weights`), and the evaluator's
local-contrast input and max pooling, which make a few small dots visible to the heads.

`fit` and `head_metrics` are shared with the TSTR utility classifier (eval/utility.py), which
trains the same architecture from scratch on a single head (the same loop, without
checkpoints or metrics files).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import pathlib
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from fundax import checkpoint
from fundax.data import labels as labels_lib
from fundax.data import phantom
from fundax.eval import consistency
from fundax.eval import evaluator as evaluator_lib
from fundax.train import guard
from fundax.train import loop
from fundax.train import metric_writers
from fundax.train import optim
from fundax.train import state as state_lib

log = logging.getLogger(__name__)

CDR_LOSS_WEIGHT = 10.0  # CDR errors are ~0.1; this brings its MSE to the scale of the CEs
# Attributes a balanced draw may pin to a uniformly drawn value (the case mix is ~70 % healthy).
_BALANCED = {"dr_grade": 5, "amd_stage": 4, "hypertensive_grade": 5, "quality": 3}
BALANCE_PROB = 0.5  # chance that a balanced draw pins each of them, independently
# Config fields that do not change the trained evaluator (left out of `run_key`).
_OPERATIONAL = ("log_every", "checkpoint_every", "max_nonfinite_steps")
# Finished runs of the shipped recipes (configs/evaluator.py's tiny and default), keyed by
# `run_key`: held-out table, metrics and params, ~1-5 MB each.
SHIPPED = pathlib.Path(__file__).parent / "evaluators"


def phantom_set(num: int, resolution: int, first_seed: int, *, balance: bool = True,
                show_progress: bool = True, num_workers: int = 0) -> tuple[np.ndarray, list]:
  """Renders `num` phantom images with seeds first_seed, first_seed + 1, ...

  Args:
    num: number of images.
    resolution: side length in pixels.
    first_seed: seed of the first image; also seeds the balancing draws.
    balance: pin each of DR grade, AMD stage, hypertensive grade and quality, independently
      with probability BALANCE_PROB, to a uniformly drawn value, so that rare grades are seen
      often enough to learn (and co-occur, so no grade is read off another disease).
    show_progress: show a tqdm bar.
    num_workers: rendering processes (the images do not depend on it).

  Returns:
    (images [num, H, W, 3] float32 in [-1, 1], list of FundusLabels).
  """
  rng = np.random.default_rng([first_seed, num])
  constraints = []
  for _ in range(num):
    pinned = {}
    for name, classes in _BALANCED.items():
      if balance and rng.random() < BALANCE_PROB:
        value = int(rng.integers(classes))
        pinned[name] = labels_lib.QUALITIES[value] if name == "quality" else value
    constraints.append(pinned)
  progress = lambda it, total: tqdm.tqdm(it, total=total, desc="phantom images",
                                         disable=not show_progress)
  images, labels = phantom.generate_images(range(first_seed, first_seed + num), resolution,
                                           constraints, num_workers=num_workers,
                                           progress=progress)
  return images.astype(np.float32) / 127.5 - 1.0, labels


def cached_phantom_set(path: pathlib.Path, num: int, resolution: int, first_seed: int,
                       balance: bool, num_workers: int = 0
                       ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """`phantom_set` as images + targets, stored at `path` (.npz) so a resumed run reuses it."""
  if path.exists():
    with np.load(path) as f:
      return f["images"], {k[2:]: f[k] for k in f.files if k.startswith("y_")}
  images, labels = phantom_set(num, resolution, first_seed, balance=balance,
                               num_workers=num_workers)
  targets = evaluator_lib.targets_from_labels(labels)
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, images=images, **{f"y_{k}": v for k, v in targets.items()})
  os.replace(tmp, path)  # atomic: an interrupted write never looks like a finished set
  return images, targets


def balanced_class_weights(targets: Mapping[str, np.ndarray],
                           heads: Mapping[str, int]) -> dict[str, np.ndarray]:
  """Inverse-frequency class weights {head: [K]} of the categorical heads ("balanced").

  w_c = N / (K * n_c), so every class present carries the same total weight; absent classes
  get weight 1 (they never occur in a batch). Without them a head facing a 70 % healthy case
  mix settles on "healthy" long before it learns to see a lesion.
  """
  out = {}
  for name, k in heads.items():
    if name in evaluator_lib.REGRESSION_HEADS:
      continue
    counts = np.bincount(np.asarray(targets[name], int), minlength=k).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (k * np.maximum(counts, 1)), 1.0)
    out[name] = w.astype(np.float32)
  return out


def uniform_class_weights(heads: Mapping[str, int]) -> dict[str, np.ndarray]:
  """Weight 1 for every class of every categorical head (plain cross-entropy)."""
  return {name: np.ones(k, np.float32) for name, k in heads.items()
          if name not in evaluator_lib.REGRESSION_HEADS}


def loss_fn(model: evaluator_lib.FundusEvaluator, params, images, targets: Mapping,
            class_weights: Mapping | None = None):
  """Sum of the per-head losses and their values.

  Categorical heads: cross-entropy, each example weighted by its class's weight and
  normalised by the batch's total weight (`class_weights`; None: plain mean). CDR: MSE times
  CDR_LOSS_WEIGHT.
  """
  logits, _ = model.apply({"params": params}, images)
  losses = {}
  for name, out in logits.items():
    if name in evaluator_lib.REGRESSION_HEADS:
      losses[name] = CDR_LOSS_WEIGHT * jnp.mean((out[:, 0] - targets[name]) ** 2)
      continue
    ce = optax.softmax_cross_entropy_with_integer_labels(out, targets[name])
    if class_weights is None:
      losses[name] = ce.mean()
    else:
      w = jnp.asarray(class_weights[name])[targets[name]]
      losses[name] = (w * ce).sum() / w.sum()
  return sum(losses.values()), losses


@functools.lru_cache(maxsize=8)
def _compiled_step(model: evaluator_lib.FundusEvaluator, optim_items: tuple):
  optimizer = optim.make_optimizer(dict(optim_items))

  def train_step(state, batch, rng, class_weights):
    del rng  # the step draws no randomness: batches and flips are drawn on the host
    (loss, losses), grads = jax.value_and_grad(
        lambda p: loss_fn(model, p, batch["image"], batch["targets"], class_weights),
        has_aux=True)(state.params)
    new_state = state_lib.apply_gradients(state, grads, optimizer)
    new_state, nonfinite = guard.keep_finite(state, new_state, guard.all_finite(loss, grads))
    return new_state, {"loss": loss, "nonfinite": nonfinite,
                       **{f"loss_{k}": v for k, v in losses.items()}}
  # One compiled program for the optimizer init instead of dozens of eager ops.
  init_state = jax.jit(lambda params: state_lib.create(params, optimizer))
  return optimizer, init_state, jax.jit(train_step, donate_argnums=0)


def make_train_step(model: evaluator_lib.FundusEvaluator, optim_config: Mapping):
  """The jitted state init and train step.

  Built from the (hashable) model and optimizer config and cached, so runs in one process with
  the same model, optimizer settings and shapes compile once. The state is donated.

  Args:
    model: the evaluator module.
    optim_config: optimizer fields (see fundax.train.optim), a dict or ConfigDict.

  Returns:
    (optimizer, init_state(params) -> TrainState,
     train_step(state, batch, rng, class_weights) -> (state, metrics)): the batch is
    {"image": [B, H, W, 3], "targets": {head: [B]}} (`train_batches`), rng is unused (None),
    and a NaN/inf loss or gradient leaves the state's params and optimizer state as they were,
    with metric `nonfinite = 1` (`fundax.train.guard`).
  """
  if hasattr(optim_config, "to_dict"):
    optim_config = optim_config.to_dict()
  return _compiled_step(model, tuple(sorted(optim_config.items())))


def batch_indices(num: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """The examples of one step: a function of (seed, step) only, so a resumed run replays it."""
  return np.random.default_rng([seed, step]).choice(num, batch_size, replace=num < batch_size)


def mirror_half(images: np.ndarray, targets: Mapping[str, np.ndarray], seed: int,
                step: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """A batch with a random half of its images mirrored left-right (the other eye).

  Which images are mirrored depends on (seed, step) only, so a resumed run replays it; a
  mirrored image's laterality target flips and every other target stays.
  """
  mirror = np.random.default_rng([seed, step, 7]).random(len(images)) < 0.5
  images = np.where(mirror[:, None, None, None], images[:, :, ::-1], images)
  targets = dict(targets)
  if "laterality" in targets:
    targets["laterality"] = np.where(mirror, 1 - targets["laterality"], targets["laterality"])
  return images, targets


def train_batches(images: np.ndarray, targets: Mapping[str, np.ndarray], *, batch_size: int,
                  seed: int, flip: bool, start: int = 0) -> Iterator[dict]:
  """The batches of steps start + 1, start + 2, ...: `batch_indices` (and `mirror_half`).

  Each batch is a function of (seed, step) only, so a run resumed at `start` draws the
  batches an uninterrupted run draws.

  Yields:
    {"image": [B, H, W, 3], "targets": {head: [B]}}.
  """
  for step in itertools.count(start):
    idx = batch_indices(len(images), batch_size, seed, step)
    batch, batch_targets = images[idx], {k: v[idx] for k, v in targets.items()}
    if flip:
      batch, batch_targets = mirror_half(batch, batch_targets, seed, step)
    yield {"image": batch, "targets": batch_targets}


def fit(model, params, optim_config: Mapping, images: np.ndarray,
        targets: Mapping[str, np.ndarray], *, steps: int, batch_size: int, seed: int,
        class_weights: Mapping[str, np.ndarray] | None = None, flip: bool = False,
        desc: str = "train"):
  """Trains `model` on in-memory arrays for `steps` optimizer steps, keeping no checkpoints.

  The TSTR and C2ST classifiers' trainer (`train_evaluator` runs the same step and batches
  with checkpoints and metrics). Runs `loop.train_loop` without a save function, so SIGTERM
  and Ctrl-C keep their usual meaning (there is nothing to resume).

  Args:
    model: the evaluator module (any head set).
    params: initial params.
    optim_config: optimizer fields (fundax.train.optim), e.g. config.optim.
    images: [N, H, W, 3] float32.
    targets: head -> [N] targets.
    steps: total steps of the run.
    batch_size: examples per step.
    seed: batch-sampling seed.
    class_weights: {head: [K]} per-class loss weights of the categorical heads (e.g.
      `balanced_class_weights`); None: plain cross-entropy.
    flip: mirror a random half of each batch (a function of seed and step), turning each
      mirrored eye into the other one: its "laterality" target (0 right, 1 left) flips too.
      Doubles the distinct training images at no rendering cost.
    desc: progress-bar label.

  Returns:
    The final TrainState.

  Raises:
    loop.NonFiniteLossError: ten steps in a row had a NaN/inf loss (each one skipped).
  """
  _, init_state, train_step = make_train_step(model, optim_config)
  # A copy: the step donates the state, which must not delete the caller's params.
  state = init_state(jax.tree.map(jnp.array, params))
  if class_weights is None:
    class_weights = uniform_class_weights(dict(model.heads))
  result = loop.train_loop(
      state, step_fn=train_step,
      batches=train_batches(images, targets, batch_size=batch_size, seed=seed, flip=flip),
      batch_keys=None, rng=None, extra=(class_weights,), num_steps=steps, writer=None,
      log_every=max(1, steps // 10), checkpoint_every=steps, save=None, desc=desc)
  return result.state


def head_metrics(predictions: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                 probabilities: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
  """Held-out scores per head, each beside what a constant guess would score.

  Categorical heads: accuracy and the majority-class rate (accuracy means little without it);
  ordinal ones also quadratic weighted kappa (0 for any constant guess); with `probabilities`,
  the AUROC of "class > 0" (any disease, DME, a not-good image, a left eye) scored by
  1 - p(class 0), which is 0.5 for a constant guess, for each grade g of a graded head the same
  AUROC of grade g against grade 0 alone (`{head}_auroc_{g}`: which signs are read, e.g. a
  hypertensive grade 1, arteriolar narrowing, against grade 4, papilloedema), and for the DR
  grade also the AUROC of referable DR (grade >= 2) scored by p(grade >= 2). CDR: MAE and
  within-0.1 accuracy, and the AUROC of a glaucomatous disc (CDR >= GLAUCOMA_CDR) scored by
  the predicted CDR. With a field head and target, laterality is also scored on
  macula-centred images alone (where the disc's side says it; a disc-centred image shows it
  only by the macula's side).
  """
  out = {}
  for name, pred in predictions.items():
    if name not in targets:  # derived predictions (e.g. glaucoma from the CDR)
      continue
    true = np.asarray(targets[name])
    if name in evaluator_lib.REGRESSION_HEADS:
      out[f"{name}_mae"] = float(np.abs(pred - true).mean())
      out[f"{name}_accuracy"] = float((np.abs(pred - true) <= 0.1).mean())
      if name == "cdr":
        out["glaucoma_auroc"] = consistency.auroc(true >= evaluator_lib.GLAUCOMA_CDR, pred)
      continue
    true = true.astype(int)
    out[f"{name}_accuracy"] = float((pred == true).mean())
    out[f"{name}_majority"] = float(np.bincount(true).max() / len(true))
    if name in consistency.ORDINAL:
      out[f"{name}_qwk"] = consistency.quadratic_weighted_kappa(
          true, pred, evaluator_lib.HEADS[name])
    if probabilities is not None and name in probabilities:
      sick = 1.0 - probabilities[name][:, 0]
      out[f"{name}_auroc"] = consistency.auroc(true > 0, sick)
      if evaluator_lib.HEADS[name] > 2:  # which grades are read: grade g alone against grade 0
        for grade in range(1, evaluator_lib.HEADS[name]):
          pair = (true == 0) | (true == grade)
          if (true == grade).any() and (true == 0).any():
            out[f"{name}_auroc_{grade}"] = consistency.auroc(true[pair] > 0, sick[pair])
      if name == "dr_grade":
        referable = consistency.REFERABLE_DR_GRADE
        out["referable_dr_auroc"] = consistency.auroc(
            true >= referable, probabilities[name][:, referable:].sum(-1))
  if "laterality" in predictions and "field" in targets:
    macula = np.asarray(targets["field"]) == 0
    out["laterality_macula_accuracy"] = float(
        (predictions["laterality"][macula] == np.asarray(targets["laterality"])[macula]).mean())
  return out


def model_config(config: ml_collections.ConfigDict) -> dict:
  """The JSON model config saved with the params."""
  return {"width": config.model.width, "stage_sizes": list(config.model.stage_sizes),
          "heads": dict(evaluator_lib.HEADS), "contrast": config.model.contrast,
          "max_pool": config.model.max_pool, "stem_stride": config.model.stem_stride,
          "resolution": config.data.resolution}


VERSION = 2  # bump when a change of this trainer or the network changes what a run produces


def run_key(config: ml_collections.ConfigDict) -> str:
  """A name for the run of `config`: the same for every config (and VERSION) that trains the
  same evaluator (logging, checkpoint spacing and rendering processes do not count)."""
  recipe = config.to_dict()
  for name in _OPERATIONAL:
    recipe.pop(name, None)
  recipe["data"] = {k: v for k, v in recipe["data"].items() if k != "num_workers"}
  payload = json.dumps({"version": VERSION, "config": recipe}, sort_keys=True, default=str)
  return "evaluator-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


def finished_run(workdir: str | os.PathLike) -> dict | None:
  """`train_evaluator`'s outputs for a run that finished in `workdir` (None otherwise).

  A run is finished when its held-out scores and its params directory are written (the last
  things `train_evaluator` does).
  """
  work = pathlib.Path(workdir)
  heldout_path, evaluator_dir = work / "heldout.json", work / "evaluator"
  if not heldout_path.is_file() or not (evaluator_dir / "config.json").is_file():
    return None
  return {"evaluator_dir": str(evaluator_dir), "metrics": str(work / "metrics.jsonl"),
          "heldout": str(heldout_path), "heldout_accuracy": json.loads(heldout_path.read_text())}


def find_run(config: ml_collections.ConfigDict, cache: str | os.PathLike | None
             ) -> tuple[pathlib.Path, dict | None]:
  """Where the run of `config` lives and its outputs if it finished.

  The evaluators that ship with fundax (`SHIPPED`, trained by `python bench/judges.py`)
  come first, then `cache/<run_key>` (trained here earlier); an unfinished run resumes in
  the cache.
  """
  key = run_key(config)
  shipped = finished_run(SHIPPED / key)
  if shipped is not None:
    return SHIPPED / key, shipped
  workdir = pathlib.Path(cache).expanduser() / key
  return workdir, finished_run(workdir)


def train_evaluator(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the evaluator on phantom data; resumable.

  Args:
    config: from configs/evaluator.py.
    workdir: output directory: checkpoints/, metrics.jsonl, tensorboard/, phantom_*.npz
      caches, evaluator/ (the params directory for `evaluator.load_evaluator`), heldout.json.

  Returns:
    {"evaluator_dir", "metrics", "heldout"}: paths, plus the held-out accuracies under
    "heldout_accuracy". A run stopped by SIGTERM or Ctrl-C (saved at its step) writes neither
    evaluator/ nor heldout.json and returns {"checkpoints", "metrics", "unfinished",
    "preempted"}.

  Raises:
    loop.NonFiniteLossError: `max_nonfinite_steps` NaN/inf steps in a row.
  """
  work = pathlib.Path(workdir)
  work.mkdir(parents=True, exist_ok=True)
  d = config.data
  train_images, train_targets = cached_phantom_set(
      work / "phantom_train.npz", d.num_train, d.resolution, d.first_seed, d.balance,
      d.num_workers)
  # Held-out seeds start after the training range, so no eye appears in both.
  test_images, test_targets = cached_phantom_set(
      work / "phantom_heldout.npz", d.num_heldout, d.resolution, d.first_seed + d.num_train,
      d.balance, d.num_workers)

  mconf = model_config(config)
  model = evaluator_lib.make_model(mconf)
  _, init_state, train_step = make_train_step(model, config.optim)
  rng_init = jax.random.fold_in(jax.random.key(config.seed), 0)
  fresh = lambda: init_state(evaluator_lib.init_params(model, rng_init, d.resolution))
  # Single-device training (the evaluator is small); restored arrays land on that device.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params_shape = jax.eval_shape(
      lambda key: model.init(key, jnp.zeros((1, d.resolution, d.resolution, 3)))["params"],
      rng_init)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          jax.eval_shape(init_state, params_shape))
  weights = (balanced_class_weights(train_targets, evaluator_lib.HEADS)
             if config.class_balance else uniform_class_weights(evaluator_lib.HEADS))
  with checkpoint.make_manager(work, max_to_keep=1) as manager:
    state, _, source = checkpoint.restore_or_init(manager, abstract, fresh)
    start = int(state.step)
    log.info("evaluator training from %s at step %d", source, start)

    def save(step, state):
      checkpoint.save(manager, step, state, config=config.to_dict(), extras={"step": step})

    with metric_writers.MetricWriter(work, resume_step=start) as writer:
      result = loop.train_loop(
          state, step_fn=train_step,
          batches=train_batches(train_images, train_targets, batch_size=config.batch_size,
                                seed=config.seed, flip=config.flip, start=start),
          batch_keys=None, rng=None, extra=(weights,), num_steps=config.optim.total_steps,
          writer=writer, log_every=config.log_every, checkpoint_every=config.checkpoint_every,
          save=save, max_nonfinite=config.max_nonfinite_steps, desc="evaluator")
    checkpoint.wait(manager)
  ended = loop.status(result, config.optim.total_steps)
  if result.preempted:
    return {"checkpoints": checkpoint.checkpoint_dir(work), "metrics": str(writer.jsonl_path),
            **ended}

  state = result.state
  heldout = head_metrics(evaluator_lib.predict(model, state.params, test_images), test_targets,
                         evaluator_lib.predict_proba(model, state.params, test_images))
  log.info("held-out phantom scores: %s", heldout)
  evaluator_dir = work / "evaluator"
  evaluator_lib.save_evaluator(evaluator_dir, state.params, mconf,
                               extra={"train_config": config.to_dict(), "heldout": heldout})
  heldout_path = work / "heldout.json"
  heldout_path.write_text(json.dumps(heldout, indent=2))
  return {"evaluator_dir": str(evaluator_dir), "metrics": str(writer.jsonl_path),
          "heldout": str(heldout_path), "heldout_accuracy": heldout, **ended}
