"""The RLHF loop: `run(config, workdir)` runs N rounds of stage 1 then stage 2, resumably.

One round:
  stage 1  `stage1.iterations` times: draw P prompts, roll out K candidates each with
           `rollout.sampler`, score them with the reward `reward` names (the Selector by
           default, `fundax.rl.reward`), turn rewards into per-prompt advantages, and apply
           `stage1.inner_epochs` DDPO updates (`fundax.rl.ddpo`);
  stage 2  `stage2.iterations` times: a new batch, scored; candidates at or above the
           Selector's learned threshold are accepted; `stage2.updates` reward-weighted
           denoising updates with the pre-training loss on phantom data (`fundax.rl.rwr`);
  humans   optionally: the last stage-2 candidates go to the rating database, simulated raters
           rate them, and the Selector is retrained on the ratings (`fundax.rl.feedback`);
  guard    the held-out prompts' images are measured by the independent evaluators; the best
           round by held-out composite is kept in `<workdir>/best`, and the loop stops when
           the Selector reward rises while the held-out score falls (`fundax.rl.guard`).

The policy starts from the LDM checkpoint's EMA UNet (its raw params when it has no EMA), which
is also the frozen reference of the KL penalty and of the negative signal. Round 0 is the
starting model, evaluated before any update. A checkpoint is written after
every stage (Orbax step = stages completed) holding the policy's train state, the reference
params and the frozen VAE and text encoder, with everything on the host as its JSON extras: the
typed `fundax.rl.run_state.RunState` (the per-prompt reward buffers, the round history, the
Selector version and path, the number of reward queries). All randomness is a function of
(seed, round, stage, iteration) or of the optimizer step, so a run interrupted after any stage
and rerun with the same command ends exactly where an uninterrupted run does. Checkpoints
describe themselves (the LDM's model configs and tokenizer), so
`fundax.sampling.load_pipeline(<workdir>/best)` samples from the kept model.

Robustness is the training loop's (`fundax.train.loop`), with a stage as the unit of work:
SIGTERM or Ctrl-C finishes the current stage, saves it and returns "preempted" (the CLI exits
75); the DDPO and RWR updates skip NaN/inf steps (`fundax.train.guard`) and too many in a row
stop the run; NaN/inf params are never saved; NaN/inf held-out readings stop the run.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fundax import checkpoint
from fundax import parallel
from fundax import sampling
from fundax.data import phantom
from fundax.data import pipeline as pipeline_lib
from fundax.data import captions
from fundax.diffusion import registry
from fundax.eval import evaluator as evaluator_lib
from fundax.models import ldm as ldm_lib
from fundax.rl import advantages as advantages_lib
from fundax.rl import ddpo
from fundax.rl import feedback
from fundax.rl import guard
from fundax.rl import prompts as prompts_lib
from fundax.rl import report
from fundax.rl import reward as reward_lib
from fundax.rl import rollout as rollout_lib
from fundax.rl import run_state
from fundax.rl import rwr
from fundax.train import loop as loop_lib
from fundax.train import metric_writers
from fundax.train import optim
from fundax.train import state as state_lib

log = logging.getLogger(__name__)

BEST_DIR = "best"
HELDOUT_DIR = "heldout"


def check_config(config: ml_collections.ConfigDict, *, need_selector: bool = True,
                 need_evaluator: bool = True) -> None:
  """Fails with a clear message, before any compute, on a config the loop cannot run."""
  errors = []
  if not config.ldm_checkpoint:
    errors.append("ldm_checkpoint is empty: give an LDM trainer's workdir or checkpoints dir")
  if need_selector and config.reward == "selector" and not config.selector_checkpoint:
    errors.append("selector_checkpoint is empty: give a Selector workdir (train_selector)")
  if need_selector and config.reward not in reward_lib.reward_names():
    errors.append(f"reward must be one of {reward_lib.reward_names()}, got {config.reward!r}")
  if config.feedback.retrain_selector and config.reward != "selector":
    errors.append(f"feedback.retrain_selector retrains the Selector reward, but reward is "
                  f"{config.reward!r}")
  if need_evaluator and not config.evaluator_checkpoint:
    errors.append("evaluator_checkpoint is empty: give an evaluator params directory")
  r = config.rollout
  if r.sampler not in registry.log_prob_sampler_names():
    errors.append(f"rollout.sampler must be a sampler with exact log-probs, one of "
                  f"{registry.log_prob_sampler_names()}, got {r.sampler!r}")
  if not r.eta > 0:
    errors.append(f"rollout.eta must be > 0 for stochastic steps with log-probs, got {r.eta}")
  if r.num_steps < 2:
    errors.append(f"rollout.num_steps must be >= 2, got {r.num_steps}")
  if r.candidates_per_prompt < 2:
    errors.append("rollout.candidates_per_prompt must be >= 2 (advantages compare candidates)")
  if config.guard.samples_per_prompt < 2:
    errors.append("guard.samples_per_prompt must be >= 2 (diversity compares samples)")
  if config.num_rounds < 1:
    errors.append(f"num_rounds must be >= 1, got {config.num_rounds}")
  if config.stage1.iterations < 0 or config.stage2.iterations < 0:
    errors.append("stage iterations must be >= 0")
  if not 0 < config.stage1.timestep_fraction <= 1:
    errors.append("stage1.timestep_fraction must be in (0, 1]")
  if config.stage1.advantage_fallback not in advantages_lib.FALLBACKS:
    errors.append(f"stage1.advantage_fallback must be one of {advantages_lib.FALLBACKS}, got "
                  f"{config.stage1.advantage_fallback!r}")
  if config.stage2.temperature <= 0:
    errors.append("stage2.temperature must be > 0")
  if not 0 < config.stage2.pretrain_batch_size <= config.stage2.pretrain_pool:
    errors.append("stage2.pretrain_batch_size must be in [1, stage2.pretrain_pool]")
  divisor = parallel.batch_size_divisor(parallel.make_mesh(config.mesh.to_dict()))
  batch = r.prompts_per_batch * r.candidates_per_prompt
  parts = config.stage1.micro_batches
  if parts < 1 or batch % (divisor * parts):
    errors.append(f"rollout.prompts_per_batch * candidates_per_prompt = {batch} must be a "
                  f"multiple of the mesh's {divisor} data-parallel devices times "
                  f"stage1.micro_batches = {parts}")
  if config.stage2.pretrain_batch_size % divisor:
    errors.append(f"stage2.pretrain_batch_size = {config.stage2.pretrain_batch_size} must be a "
                  f"multiple of the mesh's {divisor} data-parallel devices")
  if errors:
    raise ValueError("invalid RLHF config: " + "; ".join(errors))


def phantom_pool(num: int, resolution: int, first_seed: int, caption_seed: int):
  """Phantom images at `resolution` (float [-1, 1]) and a caption of each (random style)."""
  rng = np.random.default_rng([caption_seed])
  images, texts = [], []
  for i in range(num):
    sample = phantom.generate(seed=first_seed + i, resolution=max(64, resolution))
    images.append(pipeline_lib.to_float(pipeline_lib.resize(sample.image, resolution)))
    texts.append(captions.random_caption(sample.labels, rng))
  return np.stack(images), texts


@dataclasses.dataclass
class Loop:
  """Everything a run holds besides its state: models, jitted steps, data, reward, judges."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  pipeline: sampling.Pipeline
  ldm_meta: dict
  tx: Any
  rollout_fn: Callable
  ddpo_fn: Callable
  rwr_fn: Callable
  prompt_set: prompts_lib.PromptSet
  pretrain_images: np.ndarray
  pretrain_cond: Any
  reward: Any
  heldout_fn: Callable
  mesh: Mesh
  rng_rollout: jax.Array
  rng_stage1: jax.Array
  rng_stage2: jax.Array
  rng_heldout: jax.Array

  @property
  def batch(self) -> int:
    r = self.config.rollout
    return r.prompts_per_batch * r.candidates_per_prompt

  def tokens(self, texts):
    return sampling.tokenize_prompts(self.pipeline, list(texts))

  def shard(self, tree, axis: int = 0):
    """Places every array of `tree` on the mesh with dim `axis` split over the batch axes.

    The steps follow their inputs' shardings, so this is what makes rollouts and updates
    data-parallel; replicated inputs would have every device compute the whole batch.
    """
    def put(x):
      spec = [None] * x.ndim
      spec[axis] = parallel.batch_axes(self.mesh)
      return jax.device_put(x, NamedSharding(self.mesh, P(*spec)))
    return jax.tree.map(put, tree)

  def sample(self, params, frozen, texts, key):
    """A rollout of `texts` (len == batch) with the run's sampler settings."""
    tok = self.shard({k: np.asarray(v) for k, v in self.tokens(texts).items()})
    r = self.config.rollout
    return self.rollout_fn(params, frozen, tok["input_ids"], tok["attention_mask"], key,
                           jnp.float32(r.guidance_scale), jnp.float32(r.eta), tok["mirror"])

  def draw(self, round_, stage, iteration):
    """(prompts repeated K times, the rollout key) of one iteration."""
    r = self.config.rollout
    texts = self.prompt_set.draw(r.prompts_per_batch, round_, stage, iteration)
    prompts_lib.log_prompts(self.workdir, f"round{round_:03d}_stage{stage + 1}_it{iteration:03d}",
                            texts)
    key = self.rng_rollout
    for i in (round_, stage, iteration):
      key = jax.random.fold_in(key, i)
    return [p for p in texts for _ in range(r.candidates_per_prompt)], key


def make_heldout_evaluator(config, resolution: int, training_images) -> guard.HeldoutEvaluator:
  """The guard's judge: the independent evaluator with its phantom FD reference."""
  reference, _ = phantom_pool(config.guard.reference_pool, resolution,
                              config.guard.reference_seed, config.seed)
  return guard.HeldoutEvaluator(
      evaluator_lib.load_evaluator(config.evaluator_checkpoint), reference, training_images,
      config.guard.pixel_threshold, config.guard.feature_threshold)


def _embed_pretrain(pipeline: sampling.Pipeline, texts):
  tok = sampling.tokenize_prompts(pipeline, texts)
  states = jax.jit(functools.partial(ldm_lib.encode_text, pipeline.models))(
      pipeline.params["text"], tok["input_ids"], tok["attention_mask"])
  return np.asarray(states), tok["attention_mask"]


# The jitted steps of recent loops, each kept by what its program depends on, so that loops
# built again in one process (a run resumed in the same session, repeated runs in a notebook or
# a test, an ablation's arms) reuse their traces and compiles instead of paying both again (~15 s
# a loop for the tiny LDM on 2 CPU cores): the rollout by the models and the sampler, the updates
# also by the optimizer and the step fields they read (`ddpo.STEP_FIELDS`, `rwr.STEP_FIELDS`),
# not by loop settings such as the number of rounds or of batches per stage.
_STEPS: collections.OrderedDict[str, Any] = collections.OrderedDict()
_STEPS_KEPT = 12


def _cached(key: str, build: Callable[[], Any]) -> Any:
  if key not in _STEPS:
    _STEPS[key] = build()
    while len(_STEPS) > _STEPS_KEPT:
      _STEPS.popitem(last=False)
  _STEPS.move_to_end(key)
  return _STEPS[key]


def _step_fields(section: ml_collections.ConfigDict, fields) -> ml_collections.ConfigDict:
  """A copy of the fields of a config section that an update reads (reading another fails)."""
  return ml_collections.ConfigDict({name: section[name] for name in fields})


def _jitted_steps(models: ldm_lib.Models, config) -> tuple:
  """(optimizer, rollout, DDPO update, RWR update) for `models` under `config`, jitted once."""
  total = config.num_rounds * (config.stage1.iterations * config.stage1.inner_epochs
                               + config.stage2.iterations * config.stage2.updates)
  optim_config = {**config.optim.to_dict(), "total_steps": max(total, 1)}
  # A constant schedule (the RLHF default) is the same optimizer for any number of steps.
  optim_key = sorted({**optim_config, "total_steps": None}.items()
                     if optim.is_constant(optim_config) else optim_config.items())
  sampler, num_steps = config.rollout.sampler, config.rollout.num_steps
  stage1 = _step_fields(config.stage1, ddpo.STEP_FIELDS)
  stage2 = _step_fields(config.stage2, rwr.STEP_FIELDS)
  # The bundle's repr holds every field it is built from (the modules' configs and dtypes, the
  # scheduler, the tokens, the switches).
  rollout_key = repr((models, sampler, num_steps))
  update_key = repr((models, optim_key))
  tx = _cached("tx" + update_key, lambda: optim.make_optimizer(optim_config))
  rollout_fn = _cached("rollout" + rollout_key, lambda: jax.jit(functools.partial(
      rollout_lib.rollout, models=models, sampler=sampler, num_steps=num_steps)))
  ddpo_fn = _cached(
      "ddpo" + update_key + rollout_key + stage1.to_json(sort_keys=True),
      lambda: jax.jit(functools.partial(
          ddpo.ddpo_update_step, models=models, tx=tx, config=stage1, sampler=sampler,
          stochastic=rollout_lib.stochastic_steps(models, sampler, num_steps)),
          donate_argnums=(0,)))
  rwr_fn = _cached("rwr" + update_key + stage2.to_json(sort_keys=True),
                   lambda: jax.jit(functools.partial(rwr.rwr_update_step, models=models, tx=tx,
                                                     config=stage2), donate_argnums=(0,)))
  return tx, rollout_fn, ddpo_fn, rwr_fn


def build_loop(config, workdir, *, reward_fn=None, heldout_fn=None) -> Loop:
  """Loads the models, the Selector and the evaluator, and jits the steps (no state yet)."""
  pipeline = sampling.load_pipeline(config.ldm_checkpoint, use_ema=True)
  models = pipeline.models
  ldm_meta = checkpoint.load_config(config.ldm_checkpoint)
  tx, rollout_fn, ddpo_fn, rwr_fn = _jitted_steps(models, config)
  prompt_set = prompts_lib.make_prompt_set(config.seed, config.guard.num_prompts,
                                           config.prompts.file)
  resolution = models.latent_shape[0] * models.vae.config.downsample_factor
  pretrain_images, texts = phantom_pool(config.stage2.pretrain_pool, resolution,
                                        config.stage2.pretrain_seed, config.seed)
  pretrain_cond = _embed_pretrain(pipeline, texts)
  if reward_fn is None:
    reward_fn = reward_lib.make_reward(config)
  if heldout_fn is None:
    heldout_fn = make_heldout_evaluator(config, resolution, pretrain_images)
  keys = jax.random.split(jax.random.key(config.seed), 4)
  return Loop(config, pathlib.Path(workdir), pipeline, ldm_meta, tx, rollout_fn, ddpo_fn,
              rwr_fn, prompt_set, pretrain_images, pretrain_cond, reward_fn, heldout_fn,
              parallel.make_mesh(config.mesh.to_dict()), *keys)


def _threshold(reward_fn, rewards) -> float:
  """The reward's learned threshold; a reward without one accepts the top half of a batch."""
  threshold = getattr(reward_fn, "threshold", None)
  return float(np.median(rewards)) if threshold is None else float(threshold)


def _count_update(nonfinite: loop_lib.NonFiniteCounter, step: int, metrics) -> None:
  """Counts an update the guard skipped (`nonfinite = 1`); stops after too many in a row."""
  nonfinite.add(step, metrics)
  if nonfinite.resolve():
    raise loop_lib.NonFiniteLossError(
        f"{nonfinite.run} consecutive RLHF updates (up to update {step}) had a non-finite loss "
        f"or gradients and were skipped ({nonfinite.total} in this run); stopping. The last "
        "checkpoint (after the last finished stage) is the last good state: lower optim.lr, "
        "then rerun to resume from it")


def stage1(loop: Loop, state, reference, frozen, round_, run: run_state.RunState, writer,
           nonfinite: loop_lib.NonFiniteCounter):
  """Stage 1 of a round: rollouts, advantages, DDPO updates. Returns (state, train rewards)."""
  c = loop.config
  rewards_seen = []
  for it in range(c.stage1.iterations):
    texts, key = loop.draw(round_, 0, it)
    ro = loop.sample(state.params, frozen, texts, key)
    rewards = loop.reward(np.asarray(ro.images), texts)
    run.queries += len(texts)
    rewards_seen.append(rewards)
    adv, run.tracker, info = advantages_lib.compute_advantages(
        run.tracker, texts, rewards, buffer_size=c.stage1.buffer_size,
        min_count=c.stage1.min_count, clip=c.stage1.advantage_clip,
        fallback=c.stage1.advantage_fallback)
    batch = {**loop.shard({"latents": ro.latents, "log_probs": ro.log_probs}, axis=1),
             **loop.shard({"advantages": adv, "cond": ro.cond, "uncond": ro.uncond}),
             "timesteps": ro.timesteps, "prev_timesteps": ro.prev_timesteps,
             "guidance_scale": jnp.float32(c.rollout.guidance_scale),
             "eta": jnp.float32(c.rollout.eta), "clip_range": jnp.float32(c.stage1.clip_range)}
    for _ in range(c.stage1.inner_epochs):
      state, metrics = loop.ddpo_fn(state, batch, loop.rng_stage1, {"reference": reference})
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      _count_update(nonfinite, int(state.step), metrics)
      writer.write(int(state.step), {
          **metrics, "round": round_, "reward_mean": float(rewards.mean()),
          "reward_std": float(rewards.std()), "advantage_mean": float(adv.mean()),
          "advantage_std": float(adv.std()), "advantage_abs_max": float(np.abs(adv).max()),
          "per_prompt_fraction": info["per_prompt_fraction"], "queries": run.queries,
          "nonfinite_total": nonfinite.total}, split="stage1")
  mean = float(np.concatenate(rewards_seen).mean()) if rewards_seen else float("nan")
  return state, mean


def stage2(loop: Loop, state, reference, frozen, round_, run: run_state.RunState, writer,
           nonfinite: loop_lib.NonFiniteCounter):
  """Stage 2 of a round. Returns (state, accepted fraction, last candidates or None)."""
  c = loop.config
  accepted_all, last = [], None
  for it in range(c.stage2.iterations):
    texts, key = loop.draw(round_, 1, it)
    ro = loop.sample(state.params, frozen, texts, key)
    images = np.asarray(ro.images)
    rewards = loop.reward(images, texts)
    run.queries += len(texts)
    accepted = rewards >= _threshold(loop.reward, rewards)
    accepted_all.append(accepted)
    weights = rwr.reward_weights(rewards, accepted, c.stage2.temperature)
    rng = np.random.default_rng([c.seed, 3, round_, it])
    pick = rng.choice(len(loop.pretrain_images), c.stage2.pretrain_batch_size, replace=False)
    batch = loop.shard({
        "latents": ro.latents[-1], "cond": ro.cond, "weights": weights,
        "rejected": (~accepted).astype(np.float32),
        "pretrain_image": loop.pretrain_images[pick],
        "pretrain_cond": (loop.pretrain_cond[0][pick], loop.pretrain_cond[1][pick])})
    for _ in range(c.stage2.updates):
      state, metrics = loop.rwr_fn(state, batch, loop.rng_stage2,
                                   {"vae": frozen["vae"], "reference": reference})
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      _count_update(nonfinite, int(state.step), metrics)
      writer.write(int(state.step), {
          **metrics, "round": round_, "accepted_fraction": float(accepted.mean()),
          "reward_mean": float(rewards.mean()), "queries": run.queries,
          "nonfinite_total": nonfinite.total}, split="stage2")
    last = (images, texts)
  fraction = float(np.concatenate(accepted_all).mean()) if accepted_all else float("nan")
  return state, fraction, last


def heldout_images(loop: Loop, params, frozen) -> tuple[np.ndarray, list[str]]:
  """The held-out prompts' images (fixed noise), generated in rollout-sized chunks."""
  g = loop.config.guard
  texts = [p for p in loop.prompt_set.heldout for _ in range(g.samples_per_prompt)]
  out = []
  for start in range(0, len(texts), loop.batch):
    chunk = texts[start:start + loop.batch]
    padded = chunk + [chunk[-1]] * (loop.batch - len(chunk))
    ro = loop.sample(params, frozen, padded, jax.random.fold_in(loop.rng_heldout, start))
    out.append(np.asarray(ro.images)[:len(chunk)])
  return np.concatenate(out), texts


def evaluate_round(loop: Loop, params, frozen, round_, run: run_state.RunState
                   ) -> dict[str, Any]:
  """The held-out record of a round (Selector reward, independent metrics, composite).

  A metric may be NaN from round 0 on where it measures nothing (e.g. consistency when the
  evaluator reads none of the prompts' attributes); the composite leaves it out. A reward, or
  a metric that round 0 measured, turning NaN/inf means non-finite images.

  Raises:
    loop_lib.NonFiniteMetricError: such a reading is NaN/inf; it is not recorded, and the
      last checkpoint stays the last good state.
  """
  images, texts = heldout_images(loop, params, frozen)
  metrics = loop.heldout_fn(images, texts)
  history = run.history
  baseline = history[0]["metrics"] if history else metrics
  record = {"round": round_, "reward": float(loop.reward(images, texts).mean()),
            "composite": guard.composite(metrics, baseline), "metrics": metrics,
            "queries": run.queries, "selector_version": run.selector.version}
  directory = loop.workdir / HELDOUT_DIR
  if history:
    best = history[guard.best_index(history)]
    best_images = np.load(directory / f"round_{best['round']:03d}.npy")
    # The best round rescored by today's Selector: rewards of two Selector versions differ.
    record["best_reward_now"] = float(loop.reward(best_images, texts).mean())
  measured = {k: v for k, v in metrics.items() if math.isfinite(float(baseline.get(k, 0.0)))}
  readings = {"reward": record["reward"],
              "best_reward_now": record.get("best_reward_now", 0.0), **measured}
  bad = sorted(name for name, value in readings.items() if not math.isfinite(float(value)))
  if bad:
    raise loop_lib.NonFiniteMetricError(
        f"round {round_}: the held-out readings {bad} are NaN/inf (the policy gives non-finite "
        "images); stopping instead of recording them. The last checkpoint (after the last "
        "finished stage) is the last good state: lower optim.lr, then rerun to resume")
  directory.mkdir(parents=True, exist_ok=True)
  np.save(directory / f"round_{round_:03d}.npy", images)
  return record


def _save_best(loop: Loop, params, frozen, round_) -> None:
  """Writes the round's UNet as a self-describing LDM checkpoint in `<workdir>/best`."""
  manager = checkpoint.make_manager(loop.workdir / BEST_DIR, max_to_keep=1)
  try:
    if round_ not in manager.all_steps():
      checkpoint.save(manager, round_, {"state": {"params": params}, "frozen": frozen},
                      config={**loop.ldm_meta, "rlhf_round": round_}, extras={})
      checkpoint.wait(manager)
  finally:
    manager.close()


def _record_round(loop: Loop, progress: run_state.RunState, record: dict[str, Any], params,
                  frozen, step: int, writer) -> None:
  """Adds an evaluated round to the history and the metrics; keeps its model if it is best."""
  progress.history.append(record)
  writer.write(step, {"reward": record["reward"], "composite": record["composite"],
                      **record["metrics"]}, split="heldout")
  if guard.best_index(progress.history) == len(progress.history) - 1:
    _save_best(loop, params, frozen, record["round"])


def _stage(loop: Loop, db: str, progress: run_state.RunState, state, reference, frozen, writer,
           nonfinite: loop_lib.NonFiniteCounter):
  """Runs stage `progress.phase` (stage 1 or 2 of its round) and records it; returns the state.

  Stage 2 ends its round: rating feedback (if enabled), the held-out evaluation, the kept
  model and the guard's verdict.
  """
  config = loop.config
  round_, stage = divmod(progress.phase, 2)
  if stage == 0:
    state, progress.train_reward[round_] = stage1(loop, state, reference, frozen, round_,
                                                  progress, writer, nonfinite)
    return state
  state, fraction, last = stage2(loop, state, reference, frozen, round_, progress, writer,
                                 nonfinite)
  progress.accepted_fraction[round_] = fraction
  if config.feedback.enabled and last is not None:
    _feedback(loop, db, last, round_, int(state.step), progress)
  record = evaluate_round(loop, state.params, frozen, round_ + 1, progress)
  record.update(train_reward=progress.train_reward.get(round_, float("nan")),
                accepted_fraction=fraction)
  _record_round(loop, progress, record, state.params, frozen, int(state.step), writer)
  if config.guard.enabled:
    stop, reason = guard.check(progress.history, config.guard.tolerance)
    if stop:
      log.warning("reward-hacking guard: %s; keeping round %d", reason,
                  progress.history[guard.best_index(progress.history)]["round"])
      progress.stop_reason = reason
  return state


def run(config: ml_collections.ConfigDict, workdir: str, *, reward_fn=None,
        heldout_fn=None) -> dict[str, Any]:
  """Runs (or resumes) the RLHF rounds; the entry point of `fundax rlhf` and the main job.

  SIGTERM or a first Ctrl-C lets the current stage finish (a Selector retrained inside it
  too), saves its checkpoint and returns "preempted"; a second Ctrl-C stops at once. An
  update whose loss or gradients are NaN/inf is skipped (`fundax.train.guard`), and
  `max_nonfinite_steps` of them in a row stop the run; NaN/inf params are never saved, and
  NaN/inf held-out readings stop the run instead of being recorded (the errors of
  `fundax.train.loop`). Rerunning the same command resumes after the last saved stage.

  Args:
    config: a configs/rlhf.py config (ldm_checkpoint, selector_checkpoint and
      evaluator_checkpoint name the inputs).
    workdir: output directory; rerunning with the same one resumes after the last stage.
    reward_fn: a reward instead of the one `config.reward` names (tests, ablations);
      feedback retraining needs the Selector.
    heldout_fn: `(images, prompts) -> metrics` instead of the independent evaluators.

  Returns:
    Output name -> path or figure: workdir, checkpoints, best_checkpoint, metrics, report
    files, best_round, stopped, accepted_fraction, and the Selector reward, composite and
    held-out metrics before any update (`*_before`), after the last round (`*_after`) and of
    the kept round (`*_kept`, the model in `best/`); with "unfinished" when
    `stop_after_phase` ended the run early. A preempted run returns only workdir,
    checkpoints, metrics, rounds_done, "unfinished" and "preempted" (the signal's name).

  Raises:
    loop_lib.NonFiniteLossError, loop_lib.NonFiniteWeightsError,
    loop_lib.NonFiniteMetricError: see above.
  """
  check_config(config, need_selector=reward_fn is None, need_evaluator=heldout_fn is None)
  if config.feedback.retrain_selector and reward_fn is not None:
    raise ValueError("feedback.retrain_selector needs the Selector reward, not a reward_fn")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  loop = build_loop(config, workdir, reward_fn=reward_fn, heldout_fn=heldout_fn)
  replicated = parallel.replicated(loop.mesh)
  unet = loop.pipeline.params["unet"]
  frozen_host = {"vae": loop.pipeline.params["vae"], "text": loop.pipeline.params["text"]}

  def make_tree():
    return {"state": state_lib.create(unet, loop.tx), "reference": unet, "frozen": frozen_host}

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          jax.eval_shape(make_tree))
  manager = checkpoint.make_manager(workdir, max_to_keep=config.max_to_keep)
  tree, extras, source = checkpoint.restore_or_init(
      manager, abstract, lambda: jax.jit(make_tree, out_shardings=replicated)())
  progress = (run_state.RunState.from_json(extras) if extras
              else run_state.RunState.initial(config.selector_checkpoint))
  state, reference, frozen = tree["state"], tree["reference"], tree["frozen"]
  log.info("RLHF state from %s: %d stages done, %d updates", source, progress.phase,
           int(state.step))
  if reward_fn is None and progress.selector.version:
    loop.reward = reward_lib.load_selector_reward(
        progress.selector.path, progress.selector.version, config.reward_batch_size)
  writer = metric_writers.MetricWriter(workdir, resume_step=int(state.step))
  db = config.feedback.db or str(workdir / "feedback" / "ratings.sqlite")
  phases = 2 * config.num_rounds
  stop_at = config.stop_after_phase or phases
  nonfinite = loop_lib.NonFiniteCounter(config.max_nonfinite_steps)

  def save():
    loop_lib.check_weights(state, progress.phase)
    checkpoint.save(manager, progress.phase, {"state": state, "reference": reference,
                                              "frozen": frozen},
                    config={**loop.ldm_meta, "rlhf": config.to_dict()},
                    extras=progress.to_json())

  try:
    with loop_lib.Preemption() as preemption:
      if not progress.history:
        record = evaluate_round(loop, reference, frozen, 0, progress)
        _record_round(loop, progress, record, reference, frozen, 0, writer)
        if preemption.signal:
          save()  # round 0 evaluated: saved as stage 0, so the rerun does not repeat it
      with tqdm.tqdm(total=phases, initial=progress.phase, desc="rlhf", unit="stage") as bar:
        while (progress.phase < min(phases, stop_at) and not progress.stop_reason
               and not preemption.signal):
          state = _stage(loop, db, progress, state, reference, frozen, writer, nonfinite)
          progress.phase += 1
          save()
          bar.update(1)
      preempted = preemption.signal
  finally:
    checkpoint.wait(manager)
    manager.close()
    writer.close()
  if preempted:
    log.warning("preempted (%s): saved the checkpoint after stage %d; rerun to resume",
                preempted, progress.phase)
    return {"workdir": str(workdir), "checkpoints": checkpoint.checkpoint_dir(workdir),
            "metrics": str(writer.jsonl_path), "rounds_done": len(progress.history) - 1,
            "unfinished": f"preempted ({preempted}) after stage {progress.phase} of {phases}, "
                          "saved; rerun the command to resume",
            "preempted": preempted}
  out = _outputs(loop, workdir, progress, writer)
  if progress.phase < phases and not progress.stop_reason:
    out["unfinished"] = (f"stopped after stage {progress.phase} of {phases} "
                         "(stop_after_phase), saved; rerun without it to finish")
  return out


def _feedback(loop: Loop, db: str, last, round_: int, step: int,
              progress: run_state.RunState) -> None:
  """Pushes the round's last candidates to the rating store; retrains the Selector if asked."""
  config, workdir = loop.config, loop.workdir
  images, texts = last
  media = workdir / "feedback"
  counts = feedback.push_candidates(
      media / f"round_{round_:03d}", db, images, texts, seeds=[config.seed] * len(texts),
      model_step=step, media=media, simulated=config.feedback.simulate, rater_seed=config.seed)
  log.info("round %d feedback: %s", round_, counts)
  if config.feedback.retrain_selector:
    version = progress.selector.version + 1
    result = feedback.retrain_selector(db, progress.selector.path,
                                       workdir / "selector" / f"v{version}",
                                       config.feedback.selector)
    progress.selector = run_state.SelectorVersion(version, result["workdir"])
    loop.reward = reward_lib.load_selector_reward(result["workdir"], version,
                                                  config.reward_batch_size)


def _outputs(loop: Loop, workdir: pathlib.Path, progress: run_state.RunState,
             writer) -> dict[str, Any]:
  """The run's outputs for the CLI and the main job; writes the report."""
  history = progress.history
  best = history[guard.best_index(history)]
  prompts = [p for p in loop.prompt_set.heldout for _ in range(loop.config.guard.samples_per_prompt)]
  load = lambda r: np.load(workdir / HELDOUT_DIR / f"round_{r:03d}.npy")
  summary = {"history": history, "best_round": best["round"],
             "stopped": bool(progress.stop_reason), "stop_reason": progress.stop_reason,
             "queries": progress.queries, "selector": dataclasses.asdict(progress.selector),
             "heldout_prompts": list(loop.prompt_set.heldout)}
  paths = report.write_report(workdir / "report", summary, before=(load(0), prompts),
                              after=(load(best["round"]), prompts))
  last = history[-1]
  fractions = [h["accepted_fraction"] for h in history[1:] if "accepted_fraction" in h]
  return {"workdir": str(workdir), "checkpoints": checkpoint.checkpoint_dir(workdir),
          "best_checkpoint": str(workdir / BEST_DIR), "metrics": str(writer.jsonl_path),
          **paths, "best_round": best["round"], "rounds_done": len(history) - 1,
          "stopped": bool(progress.stop_reason), "stop_reason": progress.stop_reason,
          "queries": progress.queries, "reward_before": history[0]["reward"],
          "reward_after": last["reward"], "composite_before": history[0]["composite"],
          "composite_after": last["composite"], "accepted_fraction": fractions,
          "heldout_before": history[0]["metrics"], "heldout_after": last["metrics"],
          "reward_kept": best["reward"], "composite_kept": best["composite"],
          "heldout_kept": best["metrics"]}
