"""The device mesh, the logical-axis rules, and where every array lives.

Mesh axes ('data', 'fsdp', 'expert', 'tensor'), sizes from `config.mesh` (-1: the
devices left over; at most one -1). Every parameter and activation carries logical axis
names (moma_jax/model); one rules table maps them onto the mesh:

  batch   -> ('data', 'fsdp', 'expert')  every axis but 'tensor' splits the batch, in
                                         whole routing groups
  embed   -> 'fsdp'                      parameters and optimizer state split ZeRO-3
                                         style, gathered where used
  expert  -> 'expert'                    each group's experts spread over 'expert'
  mlp, heads, vocab -> 'tensor'          Megatron-style tensor parallelism
  length, kv        -> not split
A mesh axis is used once per array (an activation [batch, length, embed] is split over
batch only), and a dimension the axis does not divide stays whole (e.g. a vocabulary
of 773 under tensor=2), so every rule applies to every model size.

Presets (`PRESETS`, for `config.mesh.update(...)`): 'data' (replicated parameters),
'fsdp', 'expert' and 'tensor' put every device on one axis; combinations are set
field by field, e.g. `--config.mesh.data=2 --config.mesh.expert=4`.

On a pod slice, the mesh is laid over `jax.devices()` by `jax.make_mesh`, which puts
the innermost axes ('tensor', then 'expert') on the best-connected devices.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from moma_jax import configs
from moma_jax.model import mesh as mesh_lib
from moma_jax.model import routing_spec

RULES = (
    ('batch', mesh_lib.BATCH_AXES),
    ('embed', mesh_lib.FSDP),
    ('expert', mesh_lib.EXPERT),
    ('mlp', mesh_lib.TENSOR),
    ('heads', mesh_lib.TENSOR),
    ('vocab', mesh_lib.TENSOR),
    ('length', None),
    ('kv', None),
)
PRESETS = {
    'data': dict(data=-1, fsdp=1, expert=1, tensor=1),
    'fsdp': dict(data=1, fsdp=-1, expert=1, tensor=1),
    'expert': dict(data=1, fsdp=1, expert=-1, tensor=1),
    'tensor': dict(data=1, fsdp=1, expert=1, tensor=-1),
}


def mesh_shape(config: ml_collections.ConfigDict, device_count: int) -> dict[str, int]:
  """{axis: size} with -1 resolved; ConfigError('mesh', ...) if it cannot be laid out."""
  configs.mesh_block.validate(config.mesh)
  sizes = {a: config.mesh[a] for a in mesh_lib.AXES}
  free = [a for a, v in sizes.items() if v == -1]
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if device_count % fixed:
      raise configs.ConfigError(f'mesh.{free[0]}', f'the other axes ({fixed} devices) do '
                                f'not divide the {device_count} devices')
    sizes[free[0]] = device_count // fixed
  product = math.prod(sizes.values())
  if product != device_count:
    shape = ' x '.join(f'{a}={v}' for a, v in sizes.items())
    raise configs.ConfigError('mesh', f'{shape} is {product} devices, but there are '
                              f'{device_count}')
  return sizes


def check(config: ml_collections.ConfigDict, sizes: Mapping[str, int],
          whole_groups: bool = True) -> None:
  """ConfigError for a model or batch the mesh cannot split. whole_groups: whether the
  training batch's routing groups must split over the batch shards (teacher-forced
  routing needs it; causal decoding, token by token, does not)."""
  m, t = config.model, config.train
  x = sizes['expert']
  for e in (g.experts for g in routing_spec.from_config(config).groups):
    if e % x:
      raise configs.ConfigError('mesh.expert', f'{x} does not divide the {e} experts of a '
                                f'group (model.experts={tuple(m.experts)})')
  if not whole_groups:
    return
  shards = math.prod(sizes[a] for a in mesh_lib.BATCH_AXES)
  groups = t.batch_size // t.grad_accum // config.routing.group_size
  if groups % shards:
    raise configs.ConfigError(
        'mesh', f'{groups} routing groups per micro-batch (train.batch_size '
        f'{t.batch_size} / grad_accum {t.grad_accum} / routing.group_size '
        f'{config.routing.group_size}) do not split over {shards} batch shards '
        '(data x fsdp x expert)')


def make_mesh(config: ml_collections.ConfigDict, devices=None,
              whole_groups: bool = True) -> jax.sharding.Mesh:
  """The run's mesh over `devices` (default: all of them), checked against the config
  (`check`)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(config, len(devices))
  check(config, sizes, whole_groups)
  return jax.make_mesh(tuple(sizes[a] for a in mesh_lib.AXES), mesh_lib.AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(mesh_lib.AXES), devices=devices)


def one_device_mesh() -> jax.sharding.Mesh:
  """Every axis of size 1, on this process's first device (loading a run to look at)."""
  return jax.make_mesh((1,) * len(mesh_lib.AXES), mesh_lib.AXES, axis_types=(jax.sharding.AxisType.Auto,) *
                       len(mesh_lib.AXES), devices=jax.local_devices()[:1])


def describe(mesh: jax.sharding.Mesh) -> str:
  return ' x '.join(f'{a}={mesh.shape[a]}' for a in mesh_lib.AXES)


def axis_rules():
  """Context: the logical-axis rules, for tracing the model under a mesh."""
  return nn.logical_axis_rules(RULES)


@contextlib.contextmanager
def outside_mesh():
  """Context: no mesh and no logical-axis rules, whatever the caller has set, for
  tracing the model's initialization (its shapes and values do not depend on the mesh,
  while routing under a mesh needs whole routing groups on every batch shard, which
  the one group init runs on is not). jit out_shardings still place the results."""
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())), \
      nn.logical_axis_rules(()):
    yield


def _fit(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
  """Leaves a dimension whole where its mesh axes do not divide it."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    out.append(axes if dim % math.prod(mesh.shape[a] for a in names) == 0 else None)
  return P(*out)


def logical_shardings(mesh: jax.sharding.Mesh, logical: Any, abstract: Any) -> Any:
  """NamedShardings for a pytree, from its logical PartitionSpecs and shapes."""
  is_spec = lambda v: isinstance(v, P)
  mesh_specs = nn.logical_to_mesh(logical, RULES)
  return jax.tree.map(lambda s, a: NamedSharding(mesh, _fit(s, a.shape, mesh)),
                      mesh_specs, abstract, is_leaf=is_spec)


def state_shardings(mesh: jax.sharding.Mesh, make_boxed_state, *args) -> tuple[Any, Any]:
  """(abstract state, its NamedShardings) of `make_boxed_state(*args)`, a function
  returning the state with flax's logically partitioned boxes (e.g. init + tx.init)."""
  boxed = jax.eval_shape(make_boxed_state, *args)
  abstract = nn.unbox(boxed)
  return abstract, logical_shardings(mesh, nn.get_partition_spec(boxed), abstract)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batches [B, L]: rows over the batch axes."""
  return NamedSharding(mesh, P(mesh_lib.batch_axes(mesh)))


def global_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays placed by `sharding`.

  Process p holds rows [p*B/P, (p+1)*B/P) (moma_jax/data/pipeline.py), the order
  `jax.make_array_from_process_local_data` assembles them in.
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
