"""Rewards of generated images: the Selector's score (what stage 1 and 2 optimise) and a toy.

`SelectorReward` scores images exactly as `fundax score` scores their PNG files: float images
are quantised to uint8, resized to the Selector's resolution, and passed with the pooled
prompt embeddings of the Selector's own text encoder through `score.make_predict`. It also
carries the Selector's learned acceptance threshold and a version number (the loop retrains
the Selector on new ratings between rounds). Every scored image is one reward query.

A reward is any callable `(images [N, H, W, 3] float in [-1, 1], prompts) -> [N] scores`; the
toy `mean_brightness` lets tests check that the policy update climbs a reward it can reach.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from fundax import parallel
from fundax.data import pipeline
from fundax.selector import score as score_lib
from fundax.selector import text as text_lib

log = logging.getLogger(__name__)

RewardFn = Callable[[np.ndarray, Sequence[str]], np.ndarray]


def mean_brightness(images, prompts: Sequence[str]) -> np.ndarray:
  """Toy reward: the mean pixel value of each image, in [-1, 1]."""
  del prompts
  return np.asarray(images, np.float32).mean(axis=(1, 2, 3))


def to_uint8(images) -> np.ndarray:
  """Float images in [-1, 1] -> uint8 [0, 255] (round to nearest), as a PNG would hold them."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class SelectorReward:
  """A loaded Selector as a reward function with its threshold.

  Attributes:
    path: the Selector's workdir.
    version: 0 for the starting Selector, +1 per retraining.
    threshold: the learned acceptance threshold (accept when score >= threshold).
    resolution: the Selector's input side, px.
    predict: `score.make_predict`'s host predictor.
    params: the Selector's params.
    embed: prompt embedder of the Selector's text encoder (None: no text conditioning).
    text_dim: width of the prompt embedding.
  """
  path: str
  version: int
  threshold: float
  resolution: int
  predict: Any
  params: Any
  embed: Any
  text_dim: int
  _cache: dict = dataclasses.field(default_factory=dict)

  def prompt_text(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(pooled embeddings [N, D], has_text [N]) with one encoder call per unseen prompt."""
    if self.embed is None:
      return (np.zeros((len(prompts), self.text_dim), np.float32),
              np.zeros(len(prompts), bool))
    new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
    if new:
      self._cache.update(zip(new, self.embed(new)))
    return np.stack([self._cache[p] for p in prompts]), np.ones(len(prompts), bool)

  def __call__(self, images, prompts: Sequence[str]) -> np.ndarray:
    """Scores in [0, 1] of float images in [-1, 1] for their prompts."""
    pixels = to_uint8(images)
    pixels = np.stack([pipeline.resize(im, self.resolution) for im in pixels])
    text, has_text = self.prompt_text(list(prompts))
    return self.predict(self.params, pixels, text, has_text)["score"].astype(np.float32)


def load_selector_reward(path: str | os.PathLike, version: int = 0,
                         batch_size: int = 16) -> SelectorReward:
  """A Selector workdir (from `train_selector`) as a `SelectorReward`.

  Args:
    path: the Selector's workdir.
    version: its version in the loop.
    batch_size: images per compiled scoring call (rounded up to a multiple of the devices).

  Returns:
    The reward.
  """
  mesh = parallel.make_mesh({"data": -1})
  model, params, meta, threshold = score_lib.load_selector(path, mesh)
  divisor = parallel.batch_size_divisor(mesh)
  batch_size = divisor * -(-batch_size // divisor)
  enc = meta["text_encoder"]
  embed = None
  if enc["spec"] != text_lib.NO_TEXT:
    embed, _ = text_lib.make_prompt_embedder(enc["spec"], enc["max_length"])
  log.info("Selector v%d from %s: threshold %.4f", version, path, threshold)
  return SelectorReward(path=os.fspath(path), version=version, threshold=threshold,
                        resolution=int(meta["job"]["resolution"]),
                        predict=score_lib.make_predict(model, mesh, batch_size),
                        params=jax.device_get(params), embed=embed, text_dim=model.text_dim)
