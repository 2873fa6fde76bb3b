"""Rewards of generated images, chosen by name: the Selector's score (the default), the
independent evaluator's consistency, a toy, and any reward a user registers.

A reward is any callable `(images [N, H, W, 3] float in [-1, 1], prompts) -> [N] scores`. The
RLHF config names one (`reward` in configs/rlhf.py) and `make_reward(config)` builds it with
the factory registered under that name. A user's reward is one decorated function in any
module imported before the run:

    @reward.register_reward("sharpness")
    def make_sharpness(config):  # the RLHF config, for paths and settings
      return lambda images, prompts: laplacian_variance(images)

Built in: "selector" (`SelectorReward`: scores images exactly as `fundax score` scores their
PNG files: float images are quantised to uint8, resized to the Selector's resolution, and
passed with the pooled prompt embeddings of the Selector's own text encoder through
`score.make_predict`; it carries the Selector's learned acceptance threshold and a version
number, as the loop retrains the Selector on new ratings between rounds), "evaluator"
(`EvaluatorReward`: the fraction of each prompt's stated attributes the independent evaluator
confirms) and "mean_brightness" (a toy that lets tests check that the policy update climbs a
reward it can reach). Every scored image is one reward query.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from fundax import images as images_lib
from fundax import parallel
from fundax.data import pipeline
from fundax.eval import consistency as consistency_lib
from fundax.eval import evaluator as evaluator_lib
from fundax.selector import score as score_lib
from fundax.selector import text as text_lib

log = logging.getLogger(__name__)

RewardFn = Callable[[np.ndarray, Sequence[str]], np.ndarray]

_REWARDS: dict[str, Callable[[Any], RewardFn]] = {}


def register_reward(name: str):
  """A decorator that registers `make(config) -> RewardFn` as the reward named `name`.

  Args:
    name: what an RLHF config's `reward` field names it by.

  Returns:
    The decorator; it returns the factory unchanged.

  Raises:
    ValueError: `name` is taken.
  """
  def decorate(make: Callable[[Any], RewardFn]) -> Callable[[Any], RewardFn]:
    if name in _REWARDS:
      raise ValueError(f"a reward named {name!r} is already registered")
    _REWARDS[name] = make
    return make
  return decorate


def reward_names() -> tuple[str, ...]:
  """The registered rewards' names."""
  return tuple(_REWARDS)


def make_reward(config) -> RewardFn:
  """The reward an RLHF config names (`config.reward`), built from the config.

  Raises:
    ValueError: the name is not registered (naming those that are).
  """
  if config.reward not in _REWARDS:
    raise ValueError(f"reward must be one of {reward_names()}, got {config.reward!r} (rewards "
                     "register with fundax.rl.reward.register_reward)")
  return _REWARDS[config.reward](config)


def mean_brightness(images, prompts: Sequence[str]) -> np.ndarray:
  """Toy reward: the mean pixel value of each image, in [-1, 1]."""
  del prompts
  return np.asarray(images, np.float32).mean(axis=(1, 2, 3))


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
    pixels = images_lib.to_uint8(images)
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


@dataclasses.dataclass
class EvaluatorReward:
  """The independent evaluator as a reward: per image, the fraction of its prompt's stated
  attributes (those the evaluator reads at this resolution) that it confirms; 0 where the
  prompt states none.

  Attributes:
    evaluator: a loaded `fundax.eval.evaluator.Evaluator`.
  """
  evaluator: evaluator_lib.Evaluator

  def __call__(self, images, prompts: Sequence[str]) -> np.ndarray:
    predictions = self.evaluator.predict(np.asarray(images, np.float32))
    agree = consistency_lib.consistency(list(prompts), predictions,
                                        scored=self.evaluator.readable)
    return np.nan_to_num(np.asarray(agree["per_image_fraction"], np.float32), nan=0.0)


@register_reward("selector")
def _selector_reward(config) -> SelectorReward:
  return load_selector_reward(config.selector_checkpoint, 0, config.reward_batch_size)


@register_reward("evaluator")
def _evaluator_reward(config) -> EvaluatorReward:
  log.warning("reward 'evaluator': the guard's judge is also the reward, so the held-out "
              "consistency no longer measures reward hacking independently")
  return EvaluatorReward(evaluator_lib.load_evaluator(config.evaluator_checkpoint))


@register_reward("mean_brightness")
def _mean_brightness_reward(config) -> RewardFn:
  del config
  return mean_brightness
