"""`config.mesh`: the device mesh's axis sizes, -1 for the one axis that takes the
devices the others leave. Resolving it against the devices, and what the model and
batch need of it: moma_jax/model/sharding.py."""
from __future__ import annotations

import ml_collections

from moma_jax.configs.checks import ConfigError


def defaults() -> ml_collections.ConfigDict:
  # One field per axis of moma_jax/model/mesh.py, in its order.
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))


def validate(mesh: ml_collections.ConfigDict) -> None:
  """ConfigError unless every axis is a positive integer or -1, and at most one is -1."""
  for axis, v in mesh.items():
    if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
      raise ConfigError(f'mesh.{axis}', f'must be a positive integer or -1, got {v!r}')
  free = [a for a, v in mesh.items() if v == -1]
  if len(free) > 1:
    raise ConfigError('mesh', f'at most one axis may be -1, got {", ".join(free)}')
