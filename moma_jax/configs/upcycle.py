"""`config.upcycle`: a 1t1i MoMa run whose step `at_step` (> 0) a new run starts from,
its FFNs copied into every expert (moma_jax/training/upcycle.py, which checks that the
source run fits when it reads it)."""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from moma_jax.configs.checks import ConfigError, positive


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      from_workdir=config_dict.placeholder(str), at_step=0))


def validate(u: ml_collections.ConfigDict, model: ml_collections.ConfigDict) -> None:
  """ConfigError for an upcycling request that cannot make this model."""
  if u.from_workdir is not None:
    if not u.from_workdir:
      raise ConfigError('upcycle.from_workdir', 'must name a training run directory')
    positive('upcycle.at_step', u.at_step)
    if model.ffn != 'moma':
      raise ConfigError('upcycle.from_workdir', f'upcycling makes a MoMa model, got '
                        f'model.ffn={model.ffn}')
  elif u.at_step:
    raise ConfigError('upcycle.at_step', f'{u.at_step!r} is set but upcycle.from_workdir '
                      'is not')
