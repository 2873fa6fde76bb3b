"""The prompt sets of the RLHF loop: training prompts per round, and fixed held-out prompts.

Prompts come from the phantom caption distribution (a sampled case's caption, image quality
unstated, in a random phrasing) or from a user file (one prompt per line). Every draw is a
pure function of (seed, round, stage, iteration), so a resumed run uses the same prompts, and
each round writes the prompts it used to `<workdir>/prompts/`. Held-out prompts come from a
separate stream and are never used for training: a training draw that repeats one is redrawn.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np

from fundax.data import captions
from fundax.data import phantom

_TRAIN_STREAM, _HELDOUT_STREAM = 1, 2


def phantom_prompt(rng: np.random.Generator) -> str:
  """The caption of a random phantom case, in a random style, without its image quality."""
  labels = phantom.sample_case(rng).labels()
  labels = dataclasses.replace(labels, quality=None, quality_defects=None)
  return captions.caption(labels, style=int(rng.integers(captions.NUM_STYLES)))


def read_prompt_file(path: str | pathlib.Path) -> list[str]:
  """Non-empty, stripped lines of a prompt file.

  Raises:
    FileNotFoundError: naming the file.
    ValueError: the file has no prompt.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"prompt file not found: {path}")
  lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
  prompts = [line for line in lines if line]
  if not prompts:
    raise ValueError(f"prompt file {path} holds no prompt")
  return prompts


@dataclasses.dataclass(frozen=True)
class PromptSet:
  """Draws training prompts (phantom or a file) and holds the held-out prompts.

  Attributes:
    seed: the run's seed.
    heldout: the held-out prompts (fixed for the run).
    file_prompts: the user's prompts, or None for the phantom caption distribution.
  """
  seed: int
  heldout: tuple[str, ...]
  file_prompts: tuple[str, ...] | None = None

  def draw(self, num: int, *ids: int) -> list[str]:
    """`num` training prompts for the draw named by `ids` (e.g. round, stage, iteration)."""
    rng = np.random.default_rng([self.seed, _TRAIN_STREAM, *ids])
    heldout = set(self.heldout)
    out = []
    for _ in range(100 * num):
      if len(out) == num:
        return out
      if self.file_prompts is not None:
        prompt = self.file_prompts[int(rng.integers(len(self.file_prompts)))]
      else:
        prompt = phantom_prompt(rng)
      if prompt not in heldout:
        out.append(prompt)
    raise ValueError("could not draw training prompts disjoint from the held-out prompts; "
                     "the prompt file needs prompts beyond the held-out ones")


def make_prompt_set(seed: int, num_heldout: int, prompt_file: str = "") -> PromptSet:
  """The run's prompt set: held-out prompts from the phantom stream, training from either."""
  rng = np.random.default_rng([seed, _HELDOUT_STREAM])
  heldout = []
  while len(heldout) < num_heldout:
    prompt = phantom_prompt(rng)
    if prompt not in heldout:
      heldout.append(prompt)
  file_prompts = tuple(read_prompt_file(prompt_file)) if prompt_file else None
  return PromptSet(seed, tuple(heldout), file_prompts)


def log_prompts(workdir: str | pathlib.Path, name: str, prompts: Sequence[str]) -> pathlib.Path:
  """Writes `<workdir>/prompts/<name>.txt` (one prompt per line) and returns its path."""
  path = pathlib.Path(workdir) / "prompts" / f"{name}.txt"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
  return path
