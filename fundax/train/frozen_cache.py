"""What the frozen networks compute for LDM training, computed once: latents and token states.

The VAE and the text encoder never change during LDM training, so encoding every batch again
costs the most of a CPU step for nothing: the real pretrained text encoder (all-MiniLM-L6-v2,
6 layers at 160 tokens) spends more per caption than the tiny UNet spends per image. This
module owns the cache that replaces them:

  * the VAE posterior (mean and std) of every training image and of its mirror image, so the
    laterality-aware flip stays a per-step choice and a fresh posterior sample is still drawn
    every step (as `ldm_step.encode_latents` does);
  * the token states of every caption phrasing a step can draw (each image, both eyes after a
    flip, every caption style), deduplicated, stored ragged (float16, only the real tokens)
    and padded to `max_length` when a batch is assembled;
  * a manifest keyed by fingerprints of the dataset files, the VAE and text-encoder params and
    every setting that changes the cached values, so a cache built for other data or another
    encoder is never used: it is rebuilt.

`CachedBatches` yields the batches `ldm_step.ldm_train_step` reads ("latents",
"text_embeddings", "attention_mask") as a function of (seed, step) only, so a resumed run
replays the same batches. Caption choice follows `pipeline.preprocess_example`: a flip mirrors
the image and turns the labels into the other eye's; the caption is regenerated from the
labels in a random style.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from fundax import parallel
from fundax.data import captions as captions_lib
from fundax.data import labels as labels_lib
from fundax.data import pipeline as pipeline_lib
from fundax.data import tokenizer as tokenizer_lib
from fundax.data.builders import features
from fundax.models import vae as vae_lib

log = logging.getLogger(__name__)

VERSION = 2  # bump when the layout or the cached maths change
MANIFEST = "manifest.json"
BATCH_KEYS = ("latents", "text_embeddings", "attention_mask")  # what a cached batch holds
_ARRAYS = ("latent_mean", "latent_std", "caption_rows", "states", "offsets", "laterality")
TEXT_BATCH = 32  # captions per text-encoder call while building
IMAGE_BATCH = 32  # images per VAE call while building


def fingerprint_arrays(tree: Any) -> str:
  """sha256 of a pytree of arrays: paths, shapes, dtypes and bytes (device arrays fetched)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
    leaf = np.ascontiguousarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype}".encode())
    h.update(leaf.tobytes())
  return h.hexdigest()


def fingerprint_files(paths: Sequence[str | os.PathLike]) -> str:
  """sha256 of the names, sizes and contents of files (in the given order)."""
  h = hashlib.sha256()
  for path in paths:
    path = pathlib.Path(path)
    h.update(f"{path.name}:{path.stat().st_size}".encode())
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """Everything the cached values depend on; its `key` names the cache directory.

  Attributes:
    data: fingerprint of the dataset split's files (`fingerprint_files(datasets.split_files)`).
    vae: fingerprint of the VAE params and config.
    text: fingerprint of the text-encoder params and config, and of the tokenizer reference.
    resolution: image side the VAE encodes, px.
    crop_fov: whether images are cropped to the field of view first.
    flip: whether mirrored images (and the other eye's captions) are cached too.
    random_caption_style: every caption style (True) or style 0 only.
    max_length: token sequence length L the states are padded (and tokenised) to.
  """
  data: str
  vae: str
  text: str
  resolution: int
  crop_fov: bool
  flip: bool
  random_caption_style: bool
  max_length: int

  @property
  def key(self) -> str:
    payload = json.dumps({"version": VERSION, **dataclasses.asdict(self)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class FrozenCache:
  """A loaded cache (arrays memory-mapped from its directory).

  Attributes:
    directory: where it lives.
    spec: what it was built from.
    latent_mean: [N, F, h, w, c] float32 unscaled posterior means; F = 2 with flips (index 1
      is the mirrored image), else 1.
    latent_std: [N, F, h, w, c] float32 posterior standard deviations.
    caption_rows: [N, F, S] int32: the caption (row of `offsets`) of example n, flip f,
      style s; S = captions.NUM_STYLES with random styles, else 1.
    states: [T, D] float16 token states of every unique caption, concatenated.
    offsets: [U + 1] int64: caption u's states are states[offsets[u]:offsets[u + 1]].
    laterality: [N] int8: example n's eye, 0 right, 1 left, -1 unknown (for canonical_eye).
  """
  directory: pathlib.Path
  spec: CacheSpec
  latent_mean: np.ndarray
  latent_std: np.ndarray
  caption_rows: np.ndarray
  states: np.ndarray
  offsets: np.ndarray
  laterality: np.ndarray

  @property
  def num_examples(self) -> int:
    return self.latent_mean.shape[0]


def _caption_texts(labels, flip: bool, random_style: bool) -> list[list[str]]:
  """[F][S] captions of one example, as `pipeline.preprocess_example` would write them."""
  views = [labels, labels.flipped()] if flip else [labels]
  styles = range(captions_lib.NUM_STYLES) if random_style else (0,)
  return [[captions_lib.caption(v, s) for s in styles] for v in views]


def _encode_images(models, vae_params, images: np.ndarray, flip: bool):
  """Posterior (mean, std) [N, F, h, w, c] of images (and their mirrors)."""
  encode = jax.jit(lambda p, x: models.vae.apply({"params": p}, x, method="encode"))
  means, stds = [], []
  for start in tqdm.trange(0, len(images), IMAGE_BATCH, desc="cache: VAE latents"):
    chunk = images[start:start + IMAGE_BATCH]
    pad = IMAGE_BATCH - len(chunk)
    batch = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    views = [batch, batch[:, :, ::-1]] if flip else [batch]
    posts = [encode(vae_params, jnp.asarray(v)) for v in views]
    means.append(np.stack([np.asarray(p.mean, np.float32)[:len(chunk)] for p in posts], 1))
    stds.append(np.stack([np.exp(0.5 * np.asarray(p.logvar, np.float32))[:len(chunk)]
                          for p in posts], 1))
  return np.concatenate(means), np.concatenate(stds)


def _encode_captions(models, text_params, tokenizer, texts: Sequence[str], max_length: int,
                     text_mask: bool) -> tuple[np.ndarray, np.ndarray]:
  """Ragged token states of `texts`: (states [T, D] float16, offsets [U + 1]).

  Captions are encoded in groups of similar length, padded only to the group's longest when
  the UNet masks padding (BERT's states of real tokens do not depend on how much masked
  padding follows them), else to `max_length` (the padding states are then seen too and
  kept).
  """
  tokens = tokenizer_lib.tokenize(tokenizer, list(texts), max_length)
  lengths = tokens["attention_mask"].sum(1) if text_mask else np.full(len(texts), max_length)
  order = np.argsort(lengths, kind="stable")
  encode = jax.jit(lambda p, ids, mask: models.text.apply({"params": p}, ids, mask))
  per_caption = [None] * len(texts)
  for start in tqdm.trange(0, len(texts), TEXT_BATCH, desc="cache: token states"):
    rows = order[start:start + TEXT_BATCH]
    # Pad groups to a multiple of 16 tokens so a handful of shapes compile.
    width = min(max_length, -(-int(lengths[rows].max()) // 16) * 16)
    pad = TEXT_BATCH - len(rows)
    ids = np.concatenate([tokens["input_ids"][rows, :width],
                          np.zeros((pad, width), np.int32)])
    mask = np.concatenate([tokens["attention_mask"][rows, :width],
                           np.zeros((pad, width), np.int32)])
    out = np.asarray(encode(text_params, ids, mask), np.float32)
    for i, row in enumerate(rows):
      per_caption[row] = out[i, :lengths[row]].astype(np.float16)
  offsets = np.concatenate([[0], np.cumsum([len(s) for s in per_caption])]).astype(np.int64)
  return np.concatenate(per_caption), offsets


def build(directory: str | os.PathLike, spec: CacheSpec, source, models, frozen,
          tokenizer) -> FrozenCache:
  """Encodes a dataset split with the frozen networks and writes the cache to `directory`.

  Args:
    directory: the cache directory (created; replaced when it exists).
    spec: what the cache is built from (see `CacheSpec`).
    source: the split's random-access data source (`datasets.load_from_config`).
    models: `fundax.models.ldm.Models` (its VAE and text encoder; `text_mask`).
    frozen: {"vae": VAE params, "text": text-encoder params}.
    tokenizer: the text tokenizer.

  Returns:
    The loaded cache.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / MANIFEST).unlink(missing_ok=True)  # an interrupted rebuild is never "valid"
  images, texts, eyes = [], [], []
  for i in tqdm.trange(len(source), desc="cache: reading images"):
    example = features.decode_example(source[i])
    image = example["image"]
    if spec.crop_fov:
      image = pipeline_lib.crop_to_fov(image)
    images.append(pipeline_lib.to_float(pipeline_lib.resize(image, spec.resolution)))
    texts.append(_caption_texts(example["labels"], spec.flip, spec.random_caption_style))
    eye = example["labels"].laterality
    eyes.append(-1 if eye is None else labels_lib.LATERALITIES.index(eye))
  latent_mean, latent_std = _encode_images(models, frozen["vae"], np.stack(images), spec.flip)
  unique = sorted({t for example in texts for view in example for t in view})
  row_of = {t: i for i, t in enumerate(unique)}
  caption_rows = np.array([[[row_of[t] for t in view] for view in example] for example in texts],
                          np.int32)
  states, offsets = _encode_captions(models, frozen["text"], tokenizer, unique,
                                     spec.max_length, models.text_mask)
  laterality = np.array(eyes, np.int8)
  for name, value in zip(_ARRAYS, (latent_mean, latent_std, caption_rows, states, offsets,
                                   laterality)):
    # A new file replaces the old one: a cache still memory-mapped keeps reading its own.
    with open(directory / f"{name}.npy.tmp", "wb") as f:
      np.save(f, value)
    os.replace(directory / f"{name}.npy.tmp", directory / f"{name}.npy")
  manifest = {"version": VERSION, "key": spec.key, "spec": dataclasses.asdict(spec),
              "num_examples": len(images), "num_captions": len(unique),
              "states_bytes": int(states.nbytes)}
  # Written last: a directory without it (an interrupted build) is rebuilt, never read.
  (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
  log.info("frozen cache in %s: %d images x %d views, %d distinct captions (%.0f MB of "
           "token states)", directory, len(images), latent_mean.shape[1], len(unique),
           states.nbytes / 2**20)
  return load(directory, spec)


def load(directory: str | os.PathLike, spec: CacheSpec) -> FrozenCache | None:
  """The cache in `directory` if it was built, completely, from exactly `spec`; else None."""
  directory = pathlib.Path(directory)
  try:
    manifest = json.loads((directory / MANIFEST).read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None
  if manifest.get("version") != VERSION or manifest.get("key") != spec.key:
    return None
  try:
    arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
  except (FileNotFoundError, ValueError) as e:
    log.warning("frozen cache in %s is damaged (%s); rebuilding it", directory, e)
    return None
  return FrozenCache(directory=directory, spec=spec, **arrays)


def load_or_build(root: str | os.PathLike, spec: CacheSpec, source, models, frozen,
                  tokenizer) -> FrozenCache:
  """The cache for `spec` under `root/<spec.key>`, built first when it is missing or stale."""
  directory = pathlib.Path(root) / spec.key
  cache = load(directory, spec)
  if cache is not None:
    log.info("frozen cache %s found in %s", spec.key, directory)
    return cache
  log.info("building the frozen cache %s in %s", spec.key, directory)
  return build(directory, spec, source, models, frozen, tokenizer)


def assemble(cache: FrozenCache, rows: np.ndarray, flips: np.ndarray, styles: np.ndarray,
             noise: np.ndarray, vae_config: vae_lib.VAEConfig,
             caption_flips: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """One host-local batch from the cache.

  Args:
    cache: the cache.
    rows: [B] example indices.
    flips: [B] 0/1: the mirrored view (needs a cache built with flips).
    styles: [B] caption styles (0 when the cache holds style 0 only).
    noise: [B, h, w, c] standard normal draws for the posterior samples.
    vae_config: the VAE's config (latent scaling).
    caption_flips: [B] 0/1: the view whose caption to use (default `flips`: a mirrored
      image with the other eye's caption; 0 with flips 1 keeps the image's own eye, for a
      canonical orientation).

  Returns:
    {"latents" [B, h, w, c] float32 (scaled posterior samples), "text_embeddings" [B, L, D]
    float32 (zeros past each caption's tokens), "attention_mask" [B, L] int32}.
  """
  mean = cache.latent_mean[rows, flips]
  std = cache.latent_std[rows, flips]
  z = mean + std * noise
  latents = (z - (vae_config.shift_factor or 0.0)) * vae_config.scaling_factor
  length = cache.spec.max_length
  text = np.zeros((len(rows), length, cache.states.shape[1]), np.float32)
  mask = np.zeros((len(rows), length), np.int32)
  caption_flips = flips if caption_flips is None else caption_flips
  for i, caption in enumerate(cache.caption_rows[rows, caption_flips, styles]):
    a, b = cache.offsets[caption], cache.offsets[caption + 1]
    text[i, :b - a] = cache.states[a:b]
    mask[i, :b - a] = 1
  return {"latents": latents.astype(np.float32), "text_embeddings": text,
          "attention_mask": mask}


class CachedBatches:
  """Endless training batches from a `FrozenCache`, sharded over a mesh; checkpointable.

  Step k's batch depends only on (seed, process, k): examples drawn without replacement
  within an epoch by a seeded permutation, flip and caption style drawn per example, and the
  posterior noise. With `canonical_eye` ("right"), every eye of the other side is shown
  mirrored with its own caption (`pipeline.preprocess_example`'s canonical orientation) and
  only eyes of unknown side are flipped at random. `get_state()`/`set_state()` carry k, so a resumed run replays exactly.
  Each process reads a disjoint shard of the examples and builds its share of the batch.
  """

  def __init__(self, cache: FrozenCache, *, global_batch_size: int, seed: int,
               vae_config: vae_lib.VAEConfig, mesh: jax.sharding.Mesh | None = None,
               process_index: int | None = None, process_count: int | None = None,
               canonical_eye: str = ""):
    if canonical_eye and cache.latent_mean.shape[1] < 2:
      raise ValueError("canonical_eye needs a cache built with flips (mirrored views)")
    self._cache = cache
    self._canonical = (labels_lib.LATERALITIES.index(canonical_eye) if canonical_eye
                       else None)
    self._seed = seed
    self._vae_config = vae_config
    self._mesh = mesh
    self._process = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch_size % count:
      raise ValueError(f"global_batch_size {global_batch_size} must be a multiple of the "
                       f"process count {count}")
    self._local = global_batch_size // count
    self._shard = np.asarray(pipeline_lib.process_shard(cache.num_examples, self._process,
                                                        count))
    if len(self._shard) < 1:
      raise ValueError(f"{cache.num_examples} cached examples give process {self._process} none")
    self._step = 0

  def __iter__(self):
    return self

  def _rows(self, step: int) -> np.ndarray:
    """This process's examples for `step`: consecutive slices of per-epoch permutations."""
    n, b = len(self._shard), self._local
    positions = np.arange(step * b, (step + 1) * b)
    out = np.empty(b, np.int64)
    for epoch in np.unique(positions // n):
      sel = positions // n == epoch
      perm = np.random.default_rng([self._seed, self._process, int(epoch)]).permutation(n)
      out[sel] = perm[positions[sel] % n]
    return self._shard[out]

  def __next__(self) -> dict[str, Any]:
    cache = self._cache
    rng = np.random.default_rng([self._seed, self._process, self._step, 1])
    rows = self._rows(self._step)
    views, styles = cache.caption_rows.shape[1:]
    flips = rng.integers(views, size=len(rows))
    style = rng.integers(styles, size=len(rows))
    noise = rng.standard_normal((len(rows),) + cache.latent_mean.shape[2:]).astype(np.float32)
    caption_flips = flips
    if self._canonical is not None:
      eyes = np.asarray(cache.laterality[rows])
      known = eyes >= 0
      flips = np.where(known, (eyes != self._canonical).astype(flips.dtype), flips)
      caption_flips = np.where(known, 0, flips)
    batch = assemble(cache, rows, flips, style, noise, self._vae_config, caption_flips)
    self._step += 1
    if self._mesh is None:
      return batch
    return parallel.host_local_to_global(batch, self._mesh)

  def get_state(self) -> dict[str, Any]:
    return {"cached_step": self._step}

  def set_state(self, state: dict[str, Any]):
    if "cached_step" not in state:
      raise ValueError(f"not a cached-batch iterator state: {sorted(state)}")
    self._step = int(state["cached_step"])
