"""`config.train`: the optimizer, its schedule, the objective's z-loss, batching, and how
often the trainer logs, evaluates and saves (moma_jax/training/)."""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from moma_jax.configs.checks import (ConfigError, at_least_zero, greater_than_zero,
                                     not_negative, positive)

SCHEDULES = ('linear', 'cosine')


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      batch_size=8, steps=200, lr=1e-3, warmup=20, schedule='linear',
      weight_decay=0.1, clip=1.0, z_loss=1e-5, grad_accum=1, seed=0,
      log_every=10, eval_every=100, ckpt_every=100, keep=3, max_nonfinite=10,
      # Evaluation reads at most this many of its batches, the validation splits mixed
      # as training mixes them (None: until a split is used up; moma_jax/runs/evaluation.py).
      eval_max_batches=config_dict.placeholder(int),
      # Batches made and placed on the devices ahead of the step (0: made when needed).
      prefetch=2))


def validate(t: ml_collections.ConfigDict, routing: ml_collections.ConfigDict) -> None:
  """ConfigError for `config.train` values the trainer cannot run with routing groups
  of `routing.group_size` sequences."""
  not_negative('train.z_loss', t.z_loss)
  for name in ('batch_size', 'steps', 'grad_accum', 'log_every', 'eval_every',
               'ckpt_every', 'keep', 'max_nonfinite'):
    positive(f'train.{name}', t[name])
  greater_than_zero('train.lr', t.lr)
  if t.schedule not in SCHEDULES:
    raise ConfigError('train.schedule', f"must be 'linear' or 'cosine', got {t.schedule!r}")
  at_least_zero('train.warmup', t.warmup)
  not_negative('train.weight_decay', t.weight_decay)
  greater_than_zero('train.clip', t.clip)
  at_least_zero('train.prefetch', t.prefetch)
  if t.eval_max_batches is not None:
    positive('train.eval_max_batches', t.eval_max_batches)
  if t.batch_size % routing.group_size:
    raise ConfigError('train.batch_size', f'{t.batch_size} is not a multiple of '
                      f'routing.group_size={routing.group_size}')
  micro, rem = divmod(t.batch_size, t.grad_accum)
  if rem or micro % routing.group_size:
    raise ConfigError('train.grad_accum', f'batch {t.batch_size} / {t.grad_accum} '
                      'micro-batches must be a multiple of routing.group_size='
                      f'{routing.group_size}')
