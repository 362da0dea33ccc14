"""The training state {'params', 'opt'}: created, or described for a restore, on a mesh.

Both run outside any mesh context: initialization needs no sharding constraints, and
`create` places the arrays through its out_shardings.

`formats(abstract)` adds to those shardings the memory layout the training step takes
the experts' arrays in; `place` puts a state (a restored one) there.

The parameters' logical axis names (flax boxes) pass through `tx.init` into the
optimizer state, so the moments of a parameter are placed like the parameter itself.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
from jax.experimental.layout import Format
from jax.experimental.layout import Layout
import optax

from moma_jax.model import param_names
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


def formats(abstract: Any) -> Any:
  """Where and how the training step takes and returns the state: each leaf's sharding
  (abstract: ShapeDtypeStructs carrying it, as `layout` gives them), and for the expert
  weights and their optimizer moments (role 'expert': [E, D, F], [E, F, D]) a row-major
  layout too, the one the grouped-matmul kernels read.

  Why (docs/design.md §5): left to the platform, an array takes its default layout, and
  a TPU's is the one that pads it least. An expert weight's last axis is rarely a
  multiple of 128 lanes (SwiGLU's 2/3 of 4 d: 2731 at 435M), so its D axis goes minor,
  and the compiled step copied every expert weight and moment into row-major and back
  at each step. On CPU and GPU the default layout is row-major: these formats change
  nothing there.
  """
  def one(path, leaf):
    if param_names.role(path) == 'expert':
      return Format(Layout(tuple(range(len(leaf.shape)))), leaf.sharding)
    return leaf.sharding
  return jax.tree_util.tree_map_with_path(one, abstract)


def place(state: Any, state_formats: Any) -> Any:
  """`state` in `state_formats` (`formats`): the arrays already laid out as they say
  are kept, the others moved there, their old buffers donated (one copy per array at
  most, on a TPU, once per run: a restored state comes back in the default layouts)."""
  def one(x, f):
    have = x.format.layout       # None where a backend reports no layouts
    if isinstance(f, Format) and have is not None and (
        have.major_to_minor != f.layout.major_to_minor):
      return jax.device_put(x, f, donate=True)
    return x
  return jax.tree.map(one, state, state_formats)


def create(model, tx, shardings: Any, seed: int) -> Any:
  """The initial state for `seed`, each array created where `shardings` (or `formats`)
  put it (the values do not depend on the mesh)."""
  init = jax.jit(lambda rng: nn.unbox(_boxed(model, tx, rng)), out_shardings=shardings)
  return init(jax.random.key(seed))
