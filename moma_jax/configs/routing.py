"""`config.routing`: how tokens are grouped for routing and how routed rows are laid out
(moma_jax/model/routing.py, moma_jax/model/routing_spec.py)."""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from moma_jax.configs.checks import ConfigError, greater_than_zero, in_unit, one_of, positive

LAYOUTS = ('ragged', 'capacity')


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      group_size=8,
      layout='ragged',
      buffer_factor=1.0,
      expected_fraction=config_dict.placeholder(tuple),
      # Expert parallelism's per-expert buffer: None = exact (nothing cut), or a factor
      # on the rows an expert expects (moma_jax/model/expert_parallel.py).
      ep_buffer_factor=config_dict.placeholder(float),
  ))


def validate(r: ml_collections.ConfigDict, model: ml_collections.ConfigDict) -> None:
  """ConfigError for `config.routing` values the model cannot route by."""
  positive('routing.group_size', r.group_size)
  one_of('routing.layout', r.layout, LAYOUTS)
  greater_than_zero('routing.buffer_factor', r.buffer_factor)
  if r.ep_buffer_factor is not None and not r.ep_buffer_factor > 0:
    raise ConfigError('routing.ep_buffer_factor', f'must be > 0 or None (exact), got '
                      f'{r.ep_buffer_factor}')
  if r.expected_fraction is not None:
    if len(r.expected_fraction) != len(model.modalities):
      raise ConfigError('routing.expected_fraction', 'needs one entry per modality')
    for f in r.expected_fraction:
      in_unit('routing.expected_fraction', f)
