"""Two-stage RLHF for the fundus generator: rollouts, advantages, policy and selection steps.

Modules: prompts (training and held-out prompt sets), rollout (trajectories with exact per-step
log-probs), reward (the Selector, and toy rewards for tests), advantages (per-prompt reward
statistics), ddpo (stage 1: PPO-clipped policy gradient), rwr (stage 2: reward-weighted
denoising on accepted candidates), guard (held-out evaluation and the reward-hacking stop),
feedback (candidates to the rating store, simulated raters, Selector retraining), report
(curves, grids, HTML/JSON), run_state (what a run saves beside its arrays), rounds
(`run(config, workdir)`: the resumable loop) and ablation.
"""
