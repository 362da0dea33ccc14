"""The device mesh's axis names, and what the model reads of the current mesh.

Axes, outermost first (docs/design.md §5 lays out what each one splits):
  data    replicas of the parameters, each with its own share of the batch
  fsdp    the batch too, with parameters and optimizer state split ZeRO-3 style
  expert  the batch too, with each group's experts spread over it
  tensor  Megatron-style splits of the FFN width, heads and vocabulary; not the batch

Every module names an axis through these constants; the rules that map logical
parameter axes onto them are moma_jax/model/sharding.py's.
"""
from __future__ import annotations

import math

import jax

DATA = 'data'
FSDP = 'fsdp'
EXPERT = 'expert'
TENSOR = 'tensor'
AXES = (DATA, FSDP, EXPERT, TENSOR)
BATCH_AXES = (DATA, FSDP, EXPERT)        # the axes that split the batch


def is_sharded() -> bool:
  """Whether the computation is being traced under a mesh of more than one device."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh.size > 1


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh's axes that split the batch, outermost first."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_shards(mesh) -> int:
  """How many shards the batch is split into on `mesh`."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))
