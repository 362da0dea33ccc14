"""The training optimizer: AdamW(0.9, 0.95) after global-norm clipping, on a schedule.

Schedule (as a function of the number of applied updates u):
  'linear'  0 -> lr over `train.warmup` updates, then linear decay to 1% of lr at
            the horizon (the paper's);
  'cosine'  the same warm-up, then cosine decay to 1% of lr.
The horizon is `train.steps`, plus the source's updates when an upcycled run carries
its optimizer (`configs.carried_updates`: the schedule goes on where the source's was).
Weight decay applies to matrices only (ndim >= 2): norm scales are not decayed.
Jointly trained auxiliary routers are clipped apart from the model (see `optimizer`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from moma_jax import configs
from moma_jax.model import param_names


B1, B2 = 0.9, 0.95          # AdamW's decay rates of its first and second moments


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
  """lr(u): linear warm-up from 0, then decay to 1% of `train.lr`."""
  t = config.train
  horizon = t.steps + configs.carried_updates(config)
  warmup = min(t.warmup, horizon)
  decay = max(1, horizon - warmup)
  if t.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, t.lr, warmup, warmup + decay, 0.01 * t.lr)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, t.lr, warmup),
       optax.linear_schedule(t.lr, 0.01 * t.lr, decay)], [warmup])


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping at train.clip, then AdamW(b1 0.9, b2 0.95, train.weight_decay).

  The model's gradients and jointly trained auxiliary routers' gradients are clipped
  each by their own norm (AdamW is elementwise), so the routers never change how the
  model is updated; without routers this is optax.clip_by_global_norm.
  """
  t = config.train
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.stateless(functools.partial(_clip_each_part, t.clip)),
      optax.adamw(learning_rate(config), b1=B1, b2=B2, weight_decay=t.weight_decay,
                  mask=decay_mask))


def _clip_each_part(max_norm: float, updates, params=None):
  """optax.clip_by_global_norm's rule, applied to the auxiliary routers' leaves and to
  the other leaves separately."""
  del params
  leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
  parts: dict[bool, list[int]] = {}
  for i, (path, _) in enumerate(leaves):
    parts.setdefault(param_names.role(path) == 'aux_router', []).append(i)
  out = [g for _, g in leaves]
  for idx in parts.values():
    norm = optax.tree.norm([out[i] for i in idx])
    for i in idx:
      g = out[i]
      out[i] = jnp.where(norm < max_norm, g, (g / norm.astype(g.dtype)) * max_norm)
  return jax.tree_util.tree_unflatten(treedef, out)


def update_count(opt_state) -> jax.Array:
  """The number of updates applied so far: the count the learning-rate schedule reads
  (int32 scalar, from `optimizer`'s state)."""
  found = [s.count for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
           if isinstance(s, optax.ScaleByScheduleState)]
  if len(found) != 1:
    raise ValueError(f'expected one scheduled transformation, found {len(found)}')
  return found[0]
