"""Two-stage RLHF: DDPO against the Selector, then active selection, with a reward-hacking guard.

  fundax rlhf --config configs/rlhf.py:tiny --workdir runs/rlhf_tiny \
      --config.ldm_checkpoint=runs/ldm_tiny --config.selector_checkpoint=runs/selector_tiny \
      --config.evaluator_checkpoint=runs/evaluator_tiny/evaluator
  fundax rlhf-ablate --config configs/rlhf.py:tiny --workdir runs/ablation_tiny ...(same paths)

Variants: default (the 128 px LDM: 20 DDIM steps, 8 prompts x 4 candidates, 5 rounds, simulated
raters and Selector retraining every round), "tiny" (the tiny LDM at 32 px: 6 steps, 4 prompts x
4 candidates, 2 rounds, one batch per stage, simulated raters without retraining; a few minutes
on a laptop CPU), "tiny_long" (the tiny LDM with 16 prompts x 4 candidates per DDPO update,
4 updates per round, each trajectory trained on one of its 5 stochastic steps, KL weight 0.1,
advantages within each prompt's candidates, 2 rounds: the size at which a 2-core CPU shows the
held-out Selector reward and the independent metrics rising together, see the README; ~10 min)
and
"test" (tiny, one round, the fewest steps: unit tests).

The reward and the rollout sampler are chosen by name: `--config.reward=evaluator` (or
`mean_brightness`, or a reward registered with `fundax.rl.reward.register_reward` in a config
file or a module it imports) and `--config.rollout.sampler=ddpm` (any sampler with exact
log-probs in `fundax.diffusion.registry`).

Expect in the workdir: `metrics.jsonl` (stage1: reward and advantage statistics, approx-KL,
clip fraction, KL to the reference; stage2: accepted fraction and losses; heldout: the guard's
metrics), `prompts/` (every batch's prompts), `heldout/round_<r>.npy`, `checkpoints/` (resume
after any stage), `best/` (the kept model, loadable by `fundax.sampling.load_pipeline`),
`feedback/` (candidates, the rating database), `selector/v<n>/` (retrained Selectors) and
`report/` (report.html, report.json, curves.png, curves_queries.png, before/after grids).
SIGTERM or Ctrl-C finishes the current stage, saves it and exits 75; rerun to resume.
"""

import ml_collections

VARIANTS = ("default", "tiny", "tiny_long", "test")


def get_config(arg=None):
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"configs/rlhf.py variants: {', '.join(VARIANTS)}; got {variant!r}")
  small = variant in ("tiny", "tiny_long", "test")
  test = variant == "test"
  c = ml_collections.ConfigDict()
  c.seed = 0  # root seed: prompts, rollout noise, timestep subsets, pre-training batches
  c.ldm_checkpoint = ""  # LDM trainer workdir or checkpoints dir (the starting policy)
  c.selector_checkpoint = ""  # Selector workdir (train_selector): the reward and threshold
  c.evaluator_checkpoint = ""  # independent evaluator params directory (the guard's judge)
  c.num_rounds = 1 if test else (2 if small else 5)  # rounds of stage 1 then stage 2
  c.mesh = ml_collections.ConfigDict({"data": -1})  # parallelism degrees (-1: all devices)
  c.max_to_keep = 2  # checkpoints (one per stage) kept in the workdir
  c.stop_after_phase = 0  # stop after this many stages (0: run all), to split a run in parts
  c.max_nonfinite_steps = 10  # stop after this many consecutive NaN/inf-loss (skipped) updates
  c.reward = "selector"  # by name: selector, evaluator, mean_brightness (fundax.rl.reward)
  c.reward_batch_size = 16  # images per compiled Selector call

  c.prompts = ml_collections.ConfigDict()
  c.prompts.file = ""  # one prompt per line; "" = the phantom caption distribution

  c.rollout = ml_collections.ConfigDict()
  c.rollout.sampler = "ddim"  # a registered sampler with exact log-probs: ddim or ddpm
  c.rollout.num_steps = 3 if test else (6 if small else 20)  # sampler steps T
  c.rollout.eta = 1.0  # DDIM stochasticity (> 0: every step but the last has a log-prob)
  c.rollout.guidance_scale = 3.0 if small else 5.0  # classifier-free guidance weight
  c.rollout.prompts_per_batch = 2 if test else (4 if small else 8)  # P prompts per batch
  c.rollout.candidates_per_prompt = 4  # K candidates per prompt

  c.stage1 = ml_collections.ConfigDict()
  c.stage1.iterations = 1 if small else 4  # rollout batches per round
  c.stage1.inner_epochs = 2  # DDPO updates per batch (PPO epochs)
  c.stage1.timestep_fraction = 0.5 if small else 0.3  # fraction of steps trained per update
  c.stage1.clip_range = 1e-4  # PPO clip epsilon on the per-element importance ratio (as DDPO)
  c.stage1.kl_weight = 1.0  # weight of the exact per-step, per-element KL to the reference
  c.stage1.micro_batches = 1  # parts per backward pass (same gradient, less memory)
  c.stage1.advantage_clip = 5.0  # advantages clipped to [-clip, clip]
  c.stage1.buffer_size = 32  # recent rewards kept per prompt
  c.stage1.min_count = 8  # per-prompt statistics from this many rewards (else the fallback)
  c.stage1.advantage_fallback = "batch"  # below min_count: "batch" or "group" (rl/advantages)

  c.stage2 = ml_collections.ConfigDict()
  c.stage2.iterations = 1 if small else 4  # scored batches per round
  c.stage2.updates = 2  # optimizer updates per batch
  c.stage2.temperature = 0.1  # reward-weighted regression temperature (Selector score units)
  c.stage2.pretrain_weight = 1.0  # weight of the denoising loss on phantom data
  c.stage2.pretrain_batch_size = 8 if small else 32  # phantom images per update
  c.stage2.pretrain_pool = 16 if test else (32 if small else 256)  # phantom images rendered
  c.stage2.pretrain_seed = 700_000_000  # first phantom seed of the pre-training pool
  c.stage2.negative_weight = 0.1  # KTO-style loss on rejected candidates; 0 disables
  c.stage2.negative_beta = 10.0  # its sharpness (per unit of denoising loss)
  c.stage2.snr_gamma = 5.0  # min-SNR-gamma weighting of the denoising losses; 0 disables

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-5 if not small else 3e-5  # learning rate (constant: end_lr_factor 1)
  c.optim.end_lr_factor = 1.0  # final LR as a fraction of lr
  c.optim.weight_decay = 0.0  # AdamW decay (none: stay near the pre-trained model)
  c.optim.grad_clip_norm = 1.0  # global gradient-norm clip

  c.guard = ml_collections.ConfigDict()
  c.guard.enabled = True  # stop on reward hacking (else only report it)
  c.guard.tolerance = 0.05  # allowed fall of the held-out composite below its best
  c.guard.num_prompts = 2 if test else 8  # held-out prompts (x samples: the guard's images)
  c.guard.samples_per_prompt = 4  # images per held-out prompt (diversity needs >= 2)
  c.guard.reference_pool = 16 if test else (32 if small else 256)  # phantom FD reference
  c.guard.reference_seed = 710_000_000  # first phantom seed of the reference
  c.guard.pixel_threshold = 0.05  # privacy: RMS pixel distance below = near-copy
  c.guard.feature_threshold = 0.2  # privacy: feature NN distance ratio below = near-copy

  c.feedback = ml_collections.ConfigDict()
  c.feedback.enabled = not test  # push each round's candidates to the rating database
  c.feedback.db = ""  # SQLite path or URL; "" = <workdir>/feedback/ratings.sqlite
  c.feedback.simulate = True  # simulated raters rate them (stand-in truth, see rl/feedback)
  c.feedback.retrain_selector = not small  # train a new Selector version on the ratings
  c.feedback.selector = ml_collections.ConfigDict()
  c.feedback.selector.num_steps = 100 if small else 1000  # retraining steps
  c.feedback.selector.graded_train = 64 if small else 1000  # phantom graded training images
  c.feedback.selector.graded_heldout = 32 if small else 200  # phantom graded held-out images

  c.ablation = ml_collections.ConfigDict()
  c.ablation.arms = ("rwr_only", "ddpo_only", "both")  # arms run on the same query budget

  if variant == "tiny_long":
    c.rollout.prompts_per_batch = 16
    c.stage1.iterations = 4
    c.stage1.inner_epochs = 1  # a second PPO epoch was ~90% clipped at clip_range 1e-4
    c.stage1.timestep_fraction = 0.2
    c.stage1.kl_weight = 0.1
    c.stage1.advantage_fallback = "group"  # rounds 1-2 kept; a 3rd gave part of the gain back
  return c
