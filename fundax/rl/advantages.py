"""Rewards to advantages with per-prompt running statistics (the DDPO stat tracker).

Each prompt keeps a buffer of its most recent `buffer_size` rewards. A batch's rewards are
appended to their prompts' buffers first; then each reward is normalised by its prompt's
buffer mean and standard deviation when the buffer holds at least `min_count` rewards, and
otherwise (a new prompt has no statistics of its own yet) by the fallback:

  "batch"  the whole batch's mean and standard deviation (DDPO's tracker);
  "group"  the mean of the prompt's own candidates in this batch, and the batch's pooled
           within-prompt standard deviation (each reward minus its prompt's batch mean), as
           group-relative policy optimisation does. With prompts that rarely repeat (the phantom
           caption distribution), "batch" compares candidates of different prompts, so how hard
           a prompt is for the Selector enters every advantage; "group" compares only the
           K candidates of one prompt (a prompt with one candidate gets advantage 0).

Advantages are clipped to [-clip, clip]. The buffers are plain JSON (prompt -> list of floats),
saved in the checkpoint extras so that a resumed run normalises exactly as an uninterrupted one.

    advantage = clip((reward - mean) / (std + EPS), -clip, clip)

with std the population standard deviation (numpy's default, ddof 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

EPS = 1e-6
FALLBACKS = ("batch", "group")  # statistics of a prompt below min_count


def compute_advantages(buffers: Mapping[str, Sequence[float]], prompts: Sequence[str],
                       rewards, *, buffer_size: int, min_count: int, clip: float,
                       fallback: str = "batch"
                       ) -> tuple[np.ndarray, dict[str, list[float]], dict]:
  """Advantages of one batch and the updated per-prompt buffers (the inputs are not changed).

  Args:
    buffers: prompt -> its recent rewards (oldest first).
    prompts: N prompt strings, one per reward.
    rewards: [N] rewards.
    buffer_size: rewards kept per prompt (the oldest are dropped).
    min_count: buffer length from which a prompt's own statistics are used.
    clip: advantages are clipped to [-clip, clip]; 0 or less disables clipping.
    fallback: the statistics of a prompt below `min_count`, one of FALLBACKS (see above).

  Returns:
    (advantages [N] float32, new buffers, info): info has "per_prompt_fraction", the fraction
    of rewards normalised with their prompt's own statistics.
  """
  rewards = np.asarray(rewards, np.float64)
  if rewards.shape != (len(prompts),):
    raise ValueError(f"{rewards.shape} rewards for {len(prompts)} prompts")
  if buffer_size < 1 or min_count < 1:
    raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size}, {min_count}")
  if fallback not in FALLBACKS:
    raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
  new = {p: list(v) for p, v in buffers.items()}
  prompts = np.asarray(list(prompts), dtype=object)
  advantages = np.zeros_like(rewards)
  own = 0
  unique = list(dict.fromkeys(prompts.tolist()))
  # The fallback's baseline for each reward (the batch mean, or its prompt's mean in this
  # batch); its scale is the RMS deviation from that baseline (the batch std for "batch").
  baseline = np.full_like(rewards, rewards.mean())
  if fallback == "group":
    for prompt in unique:
      baseline[prompts == prompt] = rewards[prompts == prompt].mean()
  fallback_std = np.sqrt(np.mean((rewards - baseline) ** 2))
  for prompt in unique:
    where = prompts == prompt
    buffer = (new.get(prompt, []) + rewards[where].tolist())[-buffer_size:]
    new[prompt] = buffer
    if len(buffer) >= min_count:
      mean, std = np.mean(buffer), np.std(buffer)
      own += int(where.sum())
    else:
      mean, std = baseline[where], fallback_std
    advantages[where] = (rewards[where] - mean) / (std + EPS)
  if clip > 0:
    advantages = np.clip(advantages, -clip, clip)
  return advantages.astype(np.float32), new, {"per_prompt_fraction": own / len(rewards)}
