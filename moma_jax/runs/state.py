"""The training state {'params', 'opt'}: created, or described for a restore, on a mesh.

Both run outside any mesh context: initialization needs no sharding constraints, and
`create` places the arrays through its out_shardings.

The parameters' logical axis names (flax boxes) pass through `tx.init` into the
optimizer state, so the moments of a parameter are placed like the parameter itself.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import optax

from moma_jax.model import sharding
from moma_jax.model import transformer


def _boxed(model: transformer.Decoder, tx: optax.GradientTransformation, rng: jax.Array):
  params = transformer.init_boxed(model, rng)
  return {'params': params, 'opt': tx.init(params)}


def layout(model, tx, mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """(abstract state with each leaf's sharding, the shardings) on `mesh`.

  The abstract state (ShapeDtypeStructs carrying their sharding) is what a checkpoint
  restores into, so a state saved under one mesh comes back placed for another.
  """
  abstract, shardings = sharding.state_shardings(
      mesh, functools.partial(_boxed, model, tx), jax.random.key(0))
  placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  return placed, shardings


def abstract_params(model, mesh: jax.sharding.Mesh) -> Any:
  """The parameters of `model` as ShapeDtypeStructs placed on `mesh` by the training
  rules (no initialization runs): what a saved run's parameters restore into, or what
  an ahead-of-time compile takes. Callable under any mesh context."""
  with sharding.outside_mesh():
    abstract, shardings = sharding.state_shardings(
        mesh, lambda: transformer.init_boxed(model, jax.random.key(0)))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def create(model, tx, shardings: Any, seed: int) -> Any:
  """The initial state for `seed`, each array created where `shardings` put it (the
  values do not depend on the mesh)."""
  init = jax.jit(lambda rng: nn.unbox(_boxed(model, tx, rng)), out_shardings=shardings)
  return init(jax.random.key(seed))
