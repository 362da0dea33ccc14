"""A training run's directory read back: its config, model and parameters.

  run = moma_jax.load('runs/quickstart/moma_4t4i')       # newest checkpoint
  run = moma_jax.load(workdir, step=200)
  logits = run.model.apply({'params': run.params}, tokens, modality, segment_ids, positions)

  run = moma_jax.load(workdir, mesh=mesh)    # a run larger than one device, sharded
  with jax.set_mesh(run.mesh), sharding.axis_rules():
    ...                                       # batches: sharding.global_batch

Only the parameters are read: the checkpoint's optimizer moments stay on disk. They are
placed on `mesh` by the training rules (moma_jax/model/sharding.py: embed over 'fsdp',
experts over 'expert', mlp/heads/vocab over 'tensor'), so each device reads and holds
its shards only; without a mesh, on this process's first device. `mesh_for` builds the
mesh of the `--config.mesh.*` flags of moma-eval, moma-aux and moma-generate.

The directory holds `config.json` and `checkpoints/` as `moma-train` writes them, and
`aux_router/` once `moma-aux` has trained post-hoc auxiliary routers on that checkpoint:
the loaded model then carries them (`run.model.aux_routers`), so that
`run.model.clone(causal=True)` decodes causally, at threshold 0.5 unless
`causal_thresholds='calibrated'` asks for the stage's compute-matched thresholds
(moma_jax/inference/thresholds.py). Reading never changes the directory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Mapping

import jax
import ml_collections
import orbax.checkpoint as ocp

from moma_jax import configs
from moma_jax.inference import aux_store
from moma_jax.inference import thresholds
from moma_jax.model import sharding
from moma_jax.model import transformer
from moma_jax import run_dir
from moma_jax.training import checkpoint as ckpt_lib
from moma_jax.training import state as train_state



def _as_tuples(value: Any) -> Any:
  """JSON lists back to the tuples the config schema uses."""
  if isinstance(value, dict):
    return {k: _as_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_as_tuples(v) for v in value)
  return value


def _merge(base: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
  out = dict(base)
  for key, value in saved.items():
    out[key] = _merge(base[key], value) if isinstance(base.get(key), dict) else value
  return out


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's validated config: `config.json` over today's defaults (a field added to
  the schema since the run was made takes its default)."""
  saved = run_dir.read_config_json(workdir)
  merged = _merge(configs.default_config().to_dict(), _as_tuples(saved))
  return configs.validate(ml_collections.ConfigDict(merged))


@contextlib.contextmanager
def _checkpoints(workdir: str):
  """The run's CheckpointManager, read-only: unlike the trainer's it never creates,
  cleans up or deletes anything, so reading a run that is still training cannot remove
  the save it has under way."""
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)   # Orbax warns that read-only is what we asked for
  try:
    manager = ocp.CheckpointManager(
        os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR), item_names=ckpt_lib.ITEMS,
        options=ocp.CheckpointManagerOptions(read_only=True))
  finally:
    absl_logger.setLevel(level)
  try:
    yield manager
  finally:
    manager.close()


def restore_params(manager: ocp.CheckpointManager, step: int,
                   target: Any) -> tuple[Any, dict[str, Any]]:
  """(params, progress) of checkpoint `step`: the 'params' subtree of its 'state' item
  alone, each array placed as `target` (sharded ShapeDtypeStructs) says.

  Orbax's partial restore trims the checkpoint's tree to `{'params': target}` before
  reading, so the optimizer moments (twice the parameters) are never read.
  """
  item = {'params': target}
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True),
      progress=ocp.args.JsonRestore()))
  if restored['progress'] is None:
    raise run_dir.RunDirError(f'{manager.directory}/{step} has no progress item')
  return restored['state']['params'], dict(restored['progress'])


def mesh_for(workdir: str, overrides: Mapping[str, int] | None,
             whole_groups: bool = True) -> jax.sharding.Mesh | None:
  """The mesh to open the run in `workdir` on: every axis 1 but `overrides` ({axis:
  size}, -1: the devices left over; the `--config.mesh.*` flags), over all devices of
  all processes; None (one device) without overrides. ConfigError('mesh...') when it
  cannot be laid out or split the run's experts, or (`whole_groups`: teacher-forced
  routing) the routing groups of its batch over the batch shards (sharding.check)."""
  if not overrides:
    return None
  config = read_config(os.path.abspath(os.path.expanduser(workdir)))
  config.mesh.update({**{a: 1 for a in sharding.AXES}, **overrides})
  return sharding.make_mesh(config, whole_groups=whole_groups)


def locate(workdir: str, step: int | None = None
           ) -> tuple[str, ml_collections.ConfigDict, int]:
  """(absolute workdir, its config, the checkpoint step: `step`, or the newest if
  None), read from config.json and the checkpoint list alone (no array is read).
  RunDirError: no such directory, no config.json, no checkpoint, or no such step."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(workdir):
    raise run_dir.RunDirError(f'no such run directory: {workdir}')
  config = read_config(workdir)
  if not ckpt_lib.has_checkpoints(workdir):
    raise run_dir.RunDirError(f'{workdir} has no checkpoint yet')
  with _checkpoints(workdir) as manager:
    steps = list(manager.all_steps())
  if not steps:
    raise run_dir.RunDirError(f'{workdir} has no complete checkpoint')
  step = max(steps) if step is None else step
  if step not in steps:
    raise run_dir.RunDirError(f'{workdir} has no checkpoint of step {step}; it has '
                              f'{", ".join(map(str, sorted(steps)))}')
  return workdir, config, step


@dataclasses.dataclass(frozen=True)
class SavedRun:
  workdir: str
  config: ml_collections.ConfigDict
  model: transformer.Decoder
  params: Any                   # the model's parameters, global arrays placed on `mesh`
  step: int                     # the checkpoint's training step
  progress: dict[str, Any]      # train_flops, tokens, data position, ... at that step
  mesh: jax.sharding.Mesh       # where `params` live: run under jax.set_mesh(mesh)


def load(workdir: str, step: int | None = None, with_aux_routers: bool = True,
         causal_thresholds: str = thresholds.HALF,
         mesh: jax.sharding.Mesh | None = None) -> SavedRun:
  """The run in `workdir` at checkpoint `step` (None: the newest), with the auxiliary
  routers of the post-hoc stage trained on that step if there is one (and
  `with_aux_routers`). causal_thresholds: 'half' (the paper's p > 0.5, the default) or
  'calibrated' (the stage's compute-matched thresholds; RunDirError without a stage).
  mesh: where the parameters (and auxiliary routers) are placed, by the training rules;
  None: this process's first device. Only the parameters are read, not the optimizer
  state."""
  if causal_thresholds not in thresholds.CHOICES:
    raise ValueError(f'causal_thresholds must be one of {thresholds.CHOICES}, got '
                     f'{causal_thresholds!r}')
  workdir, config, step = locate(workdir, step)
  mesh = sharding.one_device_mesh() if mesh is None else mesh
  model = transformer.build(config)
  with _checkpoints(workdir) as manager:
    params, progress = restore_params(manager, step, train_state.abstract_params(model, mesh))
  result = aux_store.read_result(workdir)
  staged = with_aux_routers and result is not None and result['run_step'] == step
  if staged:
    # Post-hoc routers join the model; a joint run's come back with their thresholds.
    model = transformer.build(config, aux_routers=True)
    target = aux_store.split(train_state.abstract_params(model, mesh))[1]
    params = aux_store.merge(params, aux_store.restore(workdir, target))
  if causal_thresholds == thresholds.CALIBRATED and not staged:
    raise run_dir.RunDirError(f'{workdir} has no calibrated causal thresholds for step '
                              f'{step}: moma-aux --workdir {workdir}')
  if model.aux_routers and causal_thresholds == thresholds.HALF:
    params = thresholds.at_half(params)
  return SavedRun(workdir, config, model, params, step, progress, mesh)
