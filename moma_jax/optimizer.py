"""The training optimizer: AdamW(0.9, 0.95) after global-norm clipping, on a schedule.

Schedule (as a function of the number of applied updates u):
  'linear'  0 -> lr over `train.warmup` updates, then linear decay to 1% of lr at
            `train.steps` (the paper's);
  'cosine'  the same warm-up, then cosine decay to 1% of lr.
Weight decay applies to matrices only (ndim >= 2): norm scales are not decayed.
"""
from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
  """lr(u): linear warm-up from 0, then decay to 1% of `train.lr`."""
  t = config.train
  warmup = min(t.warmup, t.steps)
  decay = max(1, t.steps - warmup)
  if t.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, t.lr, warmup, warmup + decay, 0.01 * t.lr)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, t.lr, warmup),
       optax.linear_schedule(t.lr, 0.01 * t.lr, decay)], [warmup])


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm(train.clip) then AdamW(b1 0.9, b2 0.95, train.weight_decay)."""
  t = config.train
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(t.clip),
      optax.adamw(learning_rate(config), b1=0.9, b2=0.95, weight_decay=t.weight_decay,
                  mask=decay_mask))
