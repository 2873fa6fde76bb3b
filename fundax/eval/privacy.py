"""Memorisation audit: how close is every generated image to its nearest training image?

Distances are measured in two spaces. In pixel space, as the root-mean-square difference per
pixel on the [-1, 1] scale (so a threshold means the same at every resolution). In the
independent evaluator's feature space, as a ratio: the generated image's nearest-training
distance divided by the median nearest-neighbour distance *within* the training set, so 1.0
means "as close as two different training images usually are" and a near-copy is far below
that. An image is flagged when either distance is below its threshold; the closest pairs are
returned for a side-by-side display in the report.
"""

from __future__ import annotations

import numpy as np

from fundax.eval import metrics


def nearest_neighbours(query, reference, *, chunk: int = 256,
                       exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Euclidean nearest neighbour in `reference` of every row of `query`.

  Args:
    query: [N, D].
    reference: [M, D].
    chunk: query rows per distance block (bounds memory at chunk x M).
    exclude_self: query and reference are the same set; skip each row's own match.

  Returns:
    (distances [N], indices [N]).
  """
  query, reference = np.asarray(query, np.float64), np.asarray(reference, np.float64)
  dist, idx = np.empty(len(query)), np.empty(len(query), np.int64)
  for start in range(0, len(query), chunk):
    d = metrics.pairwise_sq_distances(query[start:start + chunk], reference)
    if exclude_self:
      rows = np.arange(len(d))
      d[rows, start + rows] = np.inf
    idx[start:start + chunk] = d.argmin(1)
    dist[start:start + chunk] = np.sqrt(d.min(1))
  return dist, idx


def pixel_vectors(images) -> np.ndarray:
  """Flattens NHWC images in [-1, 1] to [N, H*W*C] vectors (uint8 is rescaled first)."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 127.5 - 1.0
  return images.reshape(len(images), -1).astype(np.float32)


def audit(generated_images, training_images, generated_features=None, training_features=None,
          *, pixel_threshold: float = 0.05, feature_threshold: float = 0.2,
          num_pairs: int = 8) -> dict:
  """Nearest-training-image distances of generated images and the near-copies among them.

  Args:
    generated_images: [N, H, W, C] generated images.
    training_images: [M, H, W, C] training images (same size).
    generated_features: optional [N, D] evaluator features of the generated images.
    training_features: optional [M, D] evaluator features of the training images (M >= 2).
    pixel_threshold: flag when the RMS pixel difference to the nearest training image is below
      this ([-1, 1] scale; 0.05 is about 6 grey levels).
    feature_threshold: flag when the feature distance ratio is below this.
    num_pairs: closest pairs (by pixel distance) to return for display.

  Returns:
    {"pixel_rms": [N], "pixel_nn": [N] training indices, "feature_ratio": [N] (when features
    are given), "feature_nn": [N], "flagged": [N] bools, "num_flagged", "fraction_flagged",
    "min_pixel_rms", "closest_pairs": [(generated index, training index, pixel_rms), ...]}.
  """
  gen, train = pixel_vectors(generated_images), pixel_vectors(training_images)
  if gen.shape[1] != train.shape[1]:
    raise ValueError(f"generated {np.shape(generated_images)[1:]} and training "
                     f"{np.shape(training_images)[1:]} images differ in size")
  dist, nn = nearest_neighbours(gen, train)
  rms = dist / np.sqrt(gen.shape[1])
  flagged = rms < pixel_threshold
  out = {"pixel_rms": rms.tolist(), "pixel_nn": nn.tolist()}
  if generated_features is not None and training_features is not None:
    f_dist, f_nn = nearest_neighbours(generated_features, training_features)
    within, _ = nearest_neighbours(training_features, training_features, exclude_self=True)
    ratio = f_dist / max(float(np.median(within)), 1e-12)
    flagged |= ratio < feature_threshold
    out.update(feature_ratio=ratio.tolist(), feature_nn=f_nn.tolist(),
               min_feature_ratio=float(ratio.min()))
  order = np.argsort(rms)[:num_pairs]
  out.update(flagged=flagged.tolist(), num_flagged=int(flagged.sum()),
             fraction_flagged=float(flagged.mean()), min_pixel_rms=float(rms.min()),
             closest_pairs=[(int(i), int(nn[i]), float(rms[i])) for i in order])
  return out
