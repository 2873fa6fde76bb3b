"""The Selector: a small CNN judge of fundus images, optionally conditioned on the prompt.

This module owns the network that the self-improvement loop trusts to stand in for a human
rater. Given an image (NHWC in [-1, 1], any square size from 64 to 256 px: features are pooled
globally) and the prompt's pooled text embedding, it returns

  * "logit": the overall acceptability logit; `sigmoid(logit)` is the score in [0, 1];
  * "criteria": one logit per entry of `CRITERIA`, each meaning "this criterion is met"
    (a clear optic disc, intact vessels, even contrast, *free of* artifacts, matches the
    prompt).

The four image-quality criteria read image features only. The prompt-match head and the
overall head read the image-text interaction: the projected text embedding FiLM-modulates the
last feature map before pooling (so the text can select where to look, e.g. red lesions when the
prompt names haemorrhages), concatenated with the plain image features. A prompt may be absent
(`has_text` False, or `text` None): its row then uses a learned null embedding, and the
prompt-match logit means nothing for it (the losses mask it).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Criteria names, in the order of the "criteria" logits; True always means "good".
CRITERIA = ("optic_disc_clarity", "vessel_structure", "contrast_illumination", "artifacts",
            "prompt_match")
IMAGE_CRITERIA = CRITERIA[:4]

_CONFIG_FIELDS = ("width", "patch_size", "stage_multipliers", "blocks_per_stage", "head_dim", "text_dim",
                  "groups")


class _ResBlock(nn.Module):
  """GroupNorm-swish-conv twice with a residual connection (channels unchanged)."""
  groups: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = x
    for i in range(2):
      h = nn.GroupNorm(self.groups, dtype=self.dtype, param_dtype=self.param_dtype,
                       name=f"norm_{i}")(h)
      h = nn.Conv(c, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype,
                  name=f"conv_{i}")(nn.swish(h))
    return x + h


class Selector(nn.Module):
  """Image (+ prompt embedding) -> overall logit and per-criterion logits.

  Attributes:
    width: channels of the stem; stage s has `width * stage_multipliers[s]` channels.
    patch_size: the stem is a `patch_size` x `patch_size` conv with that stride
      ("patchify"): small-channel convolutions at full resolution dominate the cost on CPU,
      and the quality defects (blur, casts, dust, lashes) survive a 4x4 patch embedding.
    stage_multipliers: one entry per stage; every stage halves the resolution first.
    blocks_per_stage: residual blocks after each downsampling conv.
    head_dim: width of the projected text embedding and of the heads' hidden layer.
    text_dim: width of the pooled text embedding the model is fed (the text encoder's).
    groups: GroupNorm groups (must divide every stage's channels).
    dtype: compute dtype; the returned logits are float32.
    param_dtype: parameter storage dtype.
  """
  width: int = 32
  patch_size: int = 4
  stage_multipliers: tuple[int, ...] = (1, 2, 4, 4)
  blocks_per_stage: int = 1
  head_dim: int = 128
  text_dim: int = 384
  groups: int = 8
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _dense(self, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, image: jax.Array, text: jax.Array | None = None,
               has_text: jax.Array | None = None) -> dict[str, jax.Array]:
    """Scores a batch.

    Args:
      image: float `[B, H, W, 3]` in [-1, 1].
      text: float `[B, text_dim]` pooled prompt embeddings, or None (no prompts).
      has_text: bool `[B]`, False where a row has no prompt; None means all rows have one
        (or none, when `text` is None).

    Returns:
      {"logit": float32 `[B]`, "criteria": float32 `[B, len(CRITERIA)]`}.
    """
    b = image.shape[0]
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, name="stem")(image.astype(self.dtype))
    for s, mult in enumerate(self.stage_multipliers):
      x = nn.Conv(self.width * mult, (3, 3), strides=(2, 2), dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f"down_{s}")(x)
      for i in range(self.blocks_per_stage):
        x = _ResBlock(self.groups, self.dtype, self.param_dtype, name=f"block_{s}_{i}")(x)
    x = nn.swish(nn.GroupNorm(self.groups, dtype=self.dtype, param_dtype=self.param_dtype,
                              name="norm_out")(x))  # [B, h, w, C]
    # Mean and max pooling: a small dust spot or lash moves the max, a global cast the mean.
    image_feat = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)

    null = self.param("null_text", nn.initializers.zeros, (self.text_dim,), self.param_dtype)
    if text is None:
      text = jnp.broadcast_to(null, (b, self.text_dim))
    elif has_text is not None:
      text = jnp.where(has_text[:, None], text, null)
    t = nn.swish(self._dense(self.head_dim, "text_proj")(text.astype(self.dtype)))  # [B, D]
    # FiLM before pooling; zero-initialised so training starts from the image-only model.
    film = nn.Dense(2 * x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.initializers.zeros, name="film")(t)
    gamma, beta = jnp.split(film[:, None, None, :], 2, axis=-1)
    joint = nn.swish(x * (1.0 + gamma) + beta)
    joint_feat = jnp.concatenate([joint.mean(axis=(1, 2)), joint.max(axis=(1, 2)), t], axis=-1)

    quality_h = nn.swish(self._dense(self.head_dim, "quality_hidden")(image_feat))
    quality = self._dense(len(IMAGE_CRITERIA), "quality_criteria")(quality_h)
    joint_h = nn.swish(self._dense(self.head_dim, "joint_hidden")(
        jnp.concatenate([image_feat, joint_feat], axis=-1)))
    match = self._dense(1, "prompt_match")(joint_h)
    overall = self._dense(1, "overall")(jnp.concatenate([quality_h, joint_h], axis=-1))
    return {"logit": overall[:, 0].astype(jnp.float32),
            "criteria": jnp.concatenate([quality, match], axis=-1).astype(jnp.float32)}

  def to_config(self) -> dict[str, Any]:
    """JSON-serialisable architecture config that `make_selector` rebuilds this module from."""
    config = {name: getattr(self, name) for name in _CONFIG_FIELDS}
    config["stage_multipliers"] = list(config["stage_multipliers"])
    return config


def make_selector(config: dict[str, Any], dtype: Any = jnp.float32,
                  param_dtype: Any = jnp.float32) -> Selector:
  """Builds a `Selector` from `Selector.to_config()` output (or a config section with its fields).

  Args:
    config: mapping with the fields of `Selector.to_config()`; extra keys are ignored.
    dtype: compute dtype.
    param_dtype: parameter dtype.

  Returns:
    The module.
  """
  kw = {name: config[name] for name in _CONFIG_FIELDS}
  kw["stage_multipliers"] = tuple(kw["stage_multipliers"])
  return Selector(**kw, dtype=dtype, param_dtype=param_dtype)


def init_params(model: Selector, rng: jax.Array, resolution: int) -> Any:
  """The model's parameters, initialised on a dummy batch of one image and one prompt.

  Args:
    model: the Selector.
    rng: init key.
    resolution: image side, px (the params do not depend on it; it only sizes the dummy).

  Returns:
    The params tree.
  """
  image = jnp.zeros((1, resolution, resolution, 3), jnp.float32)
  text = jnp.zeros((1, model.text_dim), jnp.float32)
  return model.init(rng, image, text, jnp.ones((1,), bool))["params"]
