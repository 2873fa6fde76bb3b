"""Optimizers and the learning-rate schedule, built from config; the EMA update.

Config fields read by `make_optimizer` / `make_schedule` (a ConfigDict or any mapping, e.g.
`config.optim`); fields marked (default) may be left out:

  lr              peak learning rate, reached at the end of warmup.
  total_steps     optimizer steps of the whole run; the cosine decay ends here.
  warmup_steps    (0) steps of linear warmup from 0 to `lr`.
  end_lr_factor   (0.0) final learning rate as a fraction of `lr`.
  b1, b2          (0.9, 0.999) Adam moment decay rates.
  eps             (1e-8) Adam denominator epsilon.
  weight_decay    (0.0) decoupled (AdamW) weight decay per unit learning rate; applied to
                  matrices and kernels only (ndim >= 2), not to biases and norm scales.
  grad_clip_norm  (0.0) clip gradients to this global L2 norm; 0 or None disables.
  ema_decay       (0.0) decay of the parameter EMA per step; 0 means no EMA is tracked. Read
                  by trainers (`ema_decay(config)`), not by the optimizer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

_DEFAULTS = {"warmup_steps": 0, "end_lr_factor": 0.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
             "weight_decay": 0.0, "grad_clip_norm": 0.0, "ema_decay": 0.0}


def _get(config: Any, name: str) -> Any:
  """A config field (ConfigDict, dict or attribute object), or its default when unset/None."""
  value = config.get(name) if hasattr(config, "get") else getattr(config, name, None)
  if value is None:
    if name not in _DEFAULTS:
      raise ValueError(f"optimizer config is missing the required field {name!r}")
    value = _DEFAULTS[name]
  return value


def make_schedule(config: Any) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `lr * end_lr_factor` at `total_steps`
  (a constant `lr` when there is neither: `is_constant`).

  Args:
    config: the optimizer config (fields in the module docstring).

  Returns:
    An optax schedule: step -> learning rate.
  """
  lr = float(_get(config, "lr"))
  total = int(_get(config, "total_steps"))
  warmup = int(_get(config, "warmup_steps"))
  if not 0 <= warmup < total:
    raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup} and {total}")
  if is_constant(config):
    return optax.constant_schedule(lr)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total,
      end_value=lr * float(_get(config, "end_lr_factor")))


def is_constant(config: Any) -> bool:
  """Whether the schedule is `lr` at every step (no warmup, no decay), whatever `total_steps`:
  one optimizer then serves runs of any length (the RLHF loop shares its compiled updates)."""
  return (int(_get(config, "warmup_steps")) == 0
          and float(_get(config, "end_lr_factor")) == 1.0)


def _decay_mask(params: Any) -> Any:
  # Decaying biases and norm scales pulls them towards 0, which hurts and saves nothing.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: Any) -> optax.GradientTransformation:
  """AdamW with warmup + cosine schedule and global-norm gradient clipping.

  Args:
    config: the optimizer config (fields in the module docstring).

  Returns:
    The optax transformation: clip (if enabled), then AdamW.
  """
  clip = float(_get(config, "grad_clip_norm") or 0.0)
  adamw = optax.adamw(
      learning_rate=make_schedule(config), b1=float(_get(config, "b1")),
      b2=float(_get(config, "b2")), eps=float(_get(config, "eps")),
      weight_decay=float(_get(config, "weight_decay")), mask=_decay_mask)
  if clip > 0:
    return optax.chain(optax.clip_by_global_norm(clip), adamw)
  return adamw


def ema_decay(config: Any) -> float:
  """The configured EMA decay (0 means no EMA)."""
  return float(_get(config, "ema_decay"))


def ema_warmup(decay: float | jax.Array, step: jax.Array) -> jax.Array:
  """The decay used at optimizer step `step` (0-based): `min(decay, (1 + step) / (10 + step))`.

  diffusers' EMAModel schedule. A constant 0.999 over a 150-step run would leave 86% of the
  random init in the average (0.999 ** 150); with the warmup the average tracks the params
  early and approaches `decay` after ~10 / (1 - decay) steps.

  Args:
    decay: the configured decay, in [0, 1].
    step: the number of updates applied before this one (traced).

  Returns:
    The decay for this update, float32.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.asarray(decay, jnp.float32), (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
  """One step of the exponential moving average: `decay * ema + (1 - decay) * params`.

  Args:
    ema: the current average (pytree).
    params: the new parameters (same structure).
    decay: in [0, 1]; may be traced.

  Returns:
    The new average, in the dtypes of `ema`.
  """
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)
