"""A small synthetic ratings export: phantom images rated by simulated raters.

Used by the "tiny" Selector config and the tests, so the rating path of the trainer runs end to
end without the feedback app or a human. Raters know the phantom's truth and are noisy: a good
image scores 4-5, usable 3, reject 1-2, each shifted by one point with probability `noise`;
some images are shown with another image's prompt (prompt_match False, and the score drops).
Criteria flags follow the defects (`data.DEFECT_CRITERIA`), with some left unrated. Pairs
prefer the better grade and tie equal grades. Records are marked `"simulated": true`.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

from fundax.data import captions
from fundax.selector import data as data_lib
from fundax.selector import ratings as ratings_lib

log = logging.getLogger(__name__)

RATERS = {"expert": 2.0, "resident": 1.0, "novice": 0.5}  # name -> rater_weight
_SCORES = {"good": (4, 5), "usable": (3, 3), "reject": (1, 2)}
_RANK = {"good": 2, "usable": 1, "reject": 0}


def write_synthetic_ratings(out_dir: str | os.PathLike, num_images: int, resolution: int,
                            seed: int, *, num_pairs: int | None = None, noise: float = 0.1,
                            mismatch_fraction: float = 0.15) -> str:
  """Renders phantom images to PNG and writes a ratings export rating them.

  Args:
    out_dir: directory for `images/*.png` and `ratings.jsonl` (created).
    num_images: images to render and rate (one rating each).
    resolution: image side, px.
    seed: randomness of grades, raters and pairs; case seeds are `seed + i`.
    num_pairs: pairwise preferences to add; None means `num_images // 2`.
    noise: probability that a score is off by one point.
    mismatch_fraction: fraction of images rated against another image's prompt.

  Returns:
    The path of the written `ratings.jsonl`.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  rng = np.random.default_rng([seed, 7])
  items = data_lib.phantom_items(num_images, resolution, seed, (0.4, 0.2, 0.4))
  paths, prompts = [], []
  for i, (_, image, labels) in enumerate(items):
    path = os.path.join(out_dir, "images", f"synthetic_{i:05d}.png")
    Image.fromarray(image).save(path)
    paths.append(path)
    prompts.append(data_lib.prompt_of(labels, int(rng.integers(captions.NUM_STYLES))))

  ratings = []
  for i, (_, _, labels) in enumerate(items):
    rater = str(rng.choice(list(RATERS)))
    score = int(rng.choice(_SCORES[labels.quality]))
    if rng.random() < noise:
      score += int(rng.choice((-1, 1)))
    prompt, match = prompts[i], True
    if rng.random() < mismatch_fraction:
      prompt, match = prompts[(i + 1 + int(rng.integers(num_images - 1))) % num_images], False
      score -= 1
    score = int(np.clip(score, 1, 5))
    crit = {k: (v if rng.random() > 0.3 else None)
            for k, v in data_lib.defect_criteria(labels.quality_defects).items()}
    crit["prompt_match"] = match
    accept = None if rng.random() < 0.3 else score >= 4
    ratings.append(ratings_lib.Rating(
        candidate_id=f"synthetic_{i:05d}", image_path=paths[i], prompt=prompt, rater=rater,
        rater_weight=RATERS[rater], simulated=True, score=score, accept=accept, criteria=crit,
        line=0))

  pairs = []
  for _ in range(num_images // 2 if num_pairs is None else num_pairs):
    a, b = (int(x) for x in rng.choice(num_images, 2, replace=False))
    qa, qb = _RANK[items[a][2].quality], _RANK[items[b][2].quality]
    rater = str(rng.choice(list(RATERS)))
    pairs.append(ratings_lib.Pair(
        image_a=paths[a], image_b=paths[b], prompt=prompts[a],
        preferred="tie" if qa == qb else ("a" if qa > qb else "b"), rater=rater,
        rater_weight=RATERS[rater], line=0))

  path = os.path.join(out_dir, "ratings.jsonl")
  ratings_lib.write_ratings(path, ratings, pairs)
  log.info("wrote %d synthetic ratings and %d pairs to %s", len(ratings), len(pairs), path)
  return path

