"""`config.upcycle`: a 1t1i MoMa run whose step `at_step` (> 0) a new run starts from,
its FFNs copied into every expert (moma_jax/training/upcycle.py, which checks that the
source run fits when it reads it).

`optimizer`: 'restart' (the paper's) starts the AdamW moments at 0 and the learning-rate
schedule at its first update; 'carry' continues the source's: each expert's moments are
its source FFN's, the fresh routers' are 0, and the schedule goes on from update
`at_step` of a horizon of `at_step + train.steps` updates (the source's own schedule
when the source trained that many steps with the same lr, warm-up and shape).
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from moma_jax.configs.checks import ConfigError, one_of, positive

OPTIMIZER = ('restart', 'carry')


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      from_workdir=config_dict.placeholder(str), at_step=0, optimizer='restart'))


def validate(u: ml_collections.ConfigDict, model: ml_collections.ConfigDict) -> None:
  """ConfigError for an upcycling request that cannot make this model."""
  one_of('upcycle.optimizer', u.optimizer, OPTIMIZER)
  if u.from_workdir is not None:
    if not u.from_workdir:
      raise ConfigError('upcycle.from_workdir', 'must name a training run directory')
    positive('upcycle.at_step', u.at_step)
    if model.ffn != 'moma':
      raise ConfigError('upcycle.from_workdir', f'upcycling makes a MoMa model, got '
                        f'model.ffn={model.ffn}')
    return
  for name, unset in (('at_step', 0), ('optimizer', 'restart')):
    if u[name] != unset:
      raise ConfigError(f'upcycle.{name}', f'{u[name]!r} is set but upcycle.from_workdir '
                        'is not')


def carried_updates(config: ml_collections.ConfigDict) -> int:
  """The optimizer updates a run starts with: the source's `at_step` when an upcycled
  run carries the source's optimizer, else 0. The learning-rate schedule's horizon is
  this plus `train.steps`."""
  u = config.upcycle
  return u.at_step if u.from_workdir and u.optimizer == 'carry' else 0
