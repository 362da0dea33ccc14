"""Ahead-of-time compilation of the training, evaluation and decode steps from shapes.

Nothing here makes an array: the state, the batch and the KV cache are
`jax.ShapeDtypeStruct`s carrying their shardings, so a step compiles for devices this
machine does not have —
  * TPU: `jax.experimental.topologies.get_topology_desc` gives the device-less devices of
    a pod slice ('v5p:2x2x2'; needs libtpu, `pip install -e '.[tpu]'`), the run's mesh is
    laid over them, and `jit(...).lower(...).compile()` runs the real TPU compiler here;
  * CUDA: `jit(...).trace(...).lower(lowering_platforms=('cuda',))` emits the GPU program
    (the Pallas kernels through Triton) on one device; compiling it needs a GPU.
The Pallas kernels trace for the target platform (`pallas_kernels.target_backend`): on
TPU the ragged grouped matmul is megablox, the rest XLA; on CUDA our Triton kernels.

    target = aot.tpu_target(config, 'v5p:2x2x2')
    built = aot.build_step(config, target, 'train')
    compiled = aot.compile_tpu(aot.lower(built, target))

Axis legend: B batch (train.batch_size sequences), L data.seq_len, S cache slots
(model.max_len).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import pallas_kernels

from moma_jax import configs
from moma_jax.data import pipeline
from moma_jax.inference import generate
from moma_jax.model import mesh as mesh_lib
from moma_jax.model import sharding
from moma_jax.model import transformer
from moma_jax.runs import evaluation
from moma_jax.training import optimizer as optimizer_lib
from moma_jax.runs import state as train_state
from moma_jax.training import step as train_step
from moma_jax import usage

STEPS = ('train', 'eval', 'decode')
PLATFORMS = ('tpu', 'cuda')
# Batch fields and their dtypes (docs/design.md §7).
BATCH_DTYPES = dict(tokens=jnp.int32, modality=jnp.int8, segment_ids=jnp.int32,
                    positions=jnp.int32, loss_mask=jnp.int32)


@dataclasses.dataclass(frozen=True)
class Target:
  """Where a program is built for: platform ('tpu' | 'cuda'), the mesh over its devices,
  the chip's name in `chips.CHIPS` ('v5p', ...; None when unknown) and the topology."""
  platform: str
  mesh: jax.sharding.Mesh
  chip: str | None
  topology: str

  @property
  def num_devices(self) -> int:
    return self.mesh.size


@dataclasses.dataclass(frozen=True)
class BuiltStep:
  """A jit'd step and its abstract arguments; `tokens`: tokens one call processes."""
  name: str
  fn: Callable
  args: tuple
  tokens: int


def topology_devices(topology: str) -> list:
  """The device-less TPU devices of a topology name such as 'v5p:2x2x2'.

  Raises UsageError (one line) for a name libtpu does not know, or when libtpu is absent.
  """
  _quiet_libtpu(topology)
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    desc = topologies.get_topology_desc(platform='tpu', topology_name=topology)
  except Exception as e:  # pylint: disable=broad-except
    # libtpu reports a bad name in several lines; the first says what went wrong.
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if not has_libtpu():
      text = "compiling for TPU needs libtpu: pip install -e '.[tpu]'"
    raise usage.UsageError(f'--topology {topology}: {text}') from e
  return list(desc.devices)


def _quiet_libtpu(topology: str) -> None:
  """Environment for libtpu on a machine without TPU chips, set before it loads.

  libtpu's lockfile keeps a second process off a machine's chips; device-less devices
  have none, and parallel compiles (test workers, several moma-compile runs) would
  otherwise stop at it. Where JAX is told not to use TPUs (JAX_PLATFORMS without 'tpu',
  e.g. `JAX_PLATFORMS=cpu`), libtpu is also told this host's accelerator type and
  worker, which it otherwise looks up in a TPU VM's metadata and warns about in several
  lines. Values already set stay.
  """
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if not platforms or 'tpu' in platforms.split(','):
    return
  gen, _, shape = topology.partition(':')
  chips = math.prod(int(d) for d in shape.split('x') if d.isdigit()) or 1
  cores = 2 if gen in ('v4', 'v5p') else 1          # v4 and v5p name slices by cores
  name = {'v5e': 'v5litepod'}.get(gen, gen)
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', f'{name}-{chips * cores}')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')


def has_libtpu() -> bool:
  """Whether the TPU compiler (the libtpu package) is installed."""
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def chip_name(topology: str) -> str:
  """'v5p:2x2x2' -> 'v5p' (the generation before the shape)."""
  return topology.split(':', 1)[0].lower()


def tpu_target(config: ml_collections.ConfigDict, topology: str) -> Target:
  """The config's mesh over a TPU topology's devices.

  Raises ConfigError when the devices cannot hold the mesh (sizes that do not multiply
  to the device count) or the batch's routing groups (groups that do not split over the
  batch shards), as moma-train would on that pod slice.
  """
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(config, devices)
  return Target('tpu', mesh, chip_name(topology), topology)


def cuda_target(config: ml_collections.ConfigDict, chip: str | None = None) -> Target:
  """One device for a CUDA lowering (this machine's first device stands in for the GPU:
  a lowering only needs the mesh's shape, and one device has no collectives to place).
  """
  del config
  mesh = jax.make_mesh((1,) * len(mesh_lib.AXES), mesh_lib.AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(mesh_lib.AXES),
                       devices=jax.devices()[:1])
  return Target('cuda', mesh, chip, 'one device')


def abstract_batch(config: ml_collections.ConfigDict, batch_sh: NamedSharding,
                   batch_size: int | None = None,
                   with_dataset: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch as ShapeDtypeStructs [B, L], rows split over the batch axes;
  with_dataset: the evaluation batches' `dataset` [B, L] int8 too."""
  shape = (batch_size or config.train.batch_size, config.data.seq_len)
  dtypes = {**BATCH_DTYPES, **({pipeline.DATASET: jnp.int8} if with_dataset else {})}
  return {k: jax.ShapeDtypeStruct(shape, d, sharding=batch_sh) for k, d in dtypes.items()}


def _scalar(dtype, mesh) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((), dtype, sharding=NamedSharding(mesh, P()))


def build_step(config: ml_collections.ConfigDict, target: Target, name: str) -> BuiltStep:
  """The step `name` ('train', 'eval' or 'decode') with its abstract arguments on
  `target.mesh`, built as moma-train, the evaluator and moma-generate build it.

  train: train_step.make_train_step(state, batch [B, L], step), the trainer's own.
  eval: evaluation.make_eval_step(params, batch [B, L]) on the evaluation batches, whose
    tokens carry their dataset (per-dataset losses from the same pass).
  decode: one new token for each of B rows against a KV cache of S slots
    (generate.decode_step). A model whose routing looks ahead (expert choice, MoD)
    decodes through auxiliary routers, which moma-aux adds after training: their
    parameters are included here as abstract shapes.
  """
  mesh = target.mesh
  batch_sh = sharding.batch_sharding(mesh)
  if name == 'train':
    model = transformer.build(config)
    tx = optimizer_lib.optimizer(config)
    abstract, _ = train_state.layout(model, tx, mesh)
    formats = train_state.formats(abstract)      # the trainer's (expert arrays row-major)
    fn = train_step.make_train_step(model, tx, config, (formats, batch_sh))
    state = jax.tree.map(lambda a, f: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=f),
                         abstract, formats)
    args = (state, abstract_batch(config, batch_sh), _scalar(jnp.int32, mesh))
    return BuiltStep(name, fn, args, config.train.batch_size * config.data.seq_len)
  if name == 'eval':
    model = transformer.build(config)
    params = train_state.abstract_params(model, mesh)
    fn = evaluation.make_eval_step(
        model, config.model.modalities, evaluation.datasets_of(config),
        shardings=(jax.tree.map(lambda a: a.sharding, params), batch_sh))
    return BuiltStep(name, fn, (params, abstract_batch(config, batch_sh, with_dataset=True)),
                     config.train.batch_size * config.data.seq_len)
  if name == 'decode':
    model = transformer.build(config, aux_routers=configs.looks_ahead(config.model) or None)
    params = train_state.abstract_params(model, mesh)
    decoder = model.in_mode(causal=True, decode=True)
    b = config.train.batch_size
    # Rows over the batch axes where they divide B; the cache's rows likewise.
    rows = (mesh_lib.batch_axes(mesh)
            if b % mesh_lib.batch_shards(mesh) == 0 else None)
    place = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(
        mesh, P(rows) if s.ndim else P()))
    cache = jax.tree.map(place, generate.cache_shapes(decoder, b))
    one = {k: place(jax.ShapeDtypeStruct((b, 1), BATCH_DTYPES[k]))
           for k in ('tokens', 'modality', 'segment_ids', 'positions')}
    fn = generate.decode_step(decoder)
    return BuiltStep(name, fn, (params, cache, one['tokens'], one['modality'],
                                one['segment_ids'], one['positions']), b)
  raise usage.UsageError(f'--build: unknown step {name!r}; one of {", ".join(STEPS)}')


def lower(built: BuiltStep, target: Target) -> jax.stages.Lowered:
  """Traces and lowers the step for the target, under its mesh and logical-axis rules;
  the Pallas kernels trace for the target's platform."""
  with jax.set_mesh(target.mesh), sharding.axis_rules(), \
      pallas_kernels.target_backend(target.platform):
    if target.platform == 'tpu':
      return built.fn.lower(*built.args)
    return built.fn.trace(*built.args).lower(lowering_platforms=(target.platform,))


def compile_tpu(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
  """Compiles a lowering for device-less TPUs, outside JAX's persistent compilation
  cache: such an executable cannot be loaded back from it (there is no client to load
  it into), so writing it there only costs time. The cache decides once per process
  whether it is used, hence the resets."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  compilation_cache.reset_cache()
  try:
    return lowered.compile()
  finally:
    jax.config.update('jax_enable_compilation_cache', enabled)
    compilation_cache.reset_cache()


def state_bytes_per_device(built: BuiltStep) -> int:
  """Bytes of the step's first argument (the state or parameters; for decode parameters
  and the KV cache) held by one device: each leaf's shard."""
  leaves = jax.tree.leaves(built.args[0])
  if built.name == 'decode':
    leaves += jax.tree.leaves(built.args[1])
  return int(sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                 for a in leaves))
