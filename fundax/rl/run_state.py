"""The RLHF run's host-side state: what `fundax.rl.rounds` saves beside the arrays.

A checkpoint of the RLHF loop (one per stage) holds the policy's train state, the reference
params and the frozen networks as arrays, and `RunState` as its JSON extras: the stages done,
the per-prompt reward buffers, the round history, the reward queries, the guard's verdict and
the Selector version the reward reads. `to_json` and `from_json` are the only ways in and out
of the checkpoint, so every field is named and typed here rather than spread over string keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class SelectorVersion:
  """The Selector the reward reads.

  Attributes:
    version: 0 for the config's `selector_checkpoint`, n for the n-th retrained one.
    path: its workdir.
  """
  version: int
  path: str


@dataclasses.dataclass
class RunState:
  """Everything an RLHF run carries between stages besides arrays (JSON-able).

  Attributes:
    selector: the Selector the reward reads (`feedback.retrain_selector` moves it on).
    phase: stages done, two per round (stage 1, stage 2); the checkpoint's step.
    tracker: prompt -> its recent stage-1 rewards (`advantages.compute_advantages`).
    history: one record per evaluated round, round 0 (the starting model) first
      (`rounds.evaluate_round`).
    queries: reward (Selector) queries so far.
    stop_reason: why the reward-hacking guard stopped the run; "" while it runs.
    train_reward: round -> mean stage-1 reward of its rollouts.
    accepted_fraction: round -> fraction of stage-2 candidates accepted.
  """
  selector: SelectorVersion
  phase: int = 0
  tracker: dict[str, list[float]] = dataclasses.field(default_factory=dict)
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  queries: int = 0
  stop_reason: str = ""
  train_reward: dict[int, float] = dataclasses.field(default_factory=dict)
  accepted_fraction: dict[int, float] = dataclasses.field(default_factory=dict)

  @classmethod
  def initial(cls, selector_checkpoint: str) -> RunState:
    """The state before round 0, reading the given Selector."""
    return cls(selector=SelectorVersion(0, selector_checkpoint))

  def to_json(self) -> dict[str, Any]:
    """The checkpoint's extras (JSON object keys are strings: rounds become "0", "1", ...)."""
    out = dataclasses.asdict(self)
    for name in ("train_reward", "accepted_fraction"):
      out[name] = {str(k): v for k, v in out[name].items()}
    return out

  @classmethod
  def from_json(cls, extras: dict[str, Any]) -> RunState:
    """The state `to_json` wrote (a checkpoint's extras)."""
    fields = dict(extras)
    fields["selector"] = SelectorVersion(**fields["selector"])
    for name in ("train_reward", "accepted_fraction"):
      fields[name] = {int(k): v for k, v in fields[name].items()}
    return cls(**fields)
