"""A saved run read back: its config, its checkpoint list and its parameters.

What training writes and both training (an upcycled run's source) and inference
(`moma_jax.load`, moma-eval, moma-aux, moma-generate) read. Reading never changes the
directory: the checkpoint manager opened here is read-only.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Mapping

import jax
import ml_collections
import orbax.checkpoint as ocp

from moma_jax import configs
from moma_jax import renamed_fields
from moma_jax import run_dir
from moma_jax.model import mesh as mesh_lib
from moma_jax.model import sharding
from moma_jax.model import transformer
from moma_jax.runs import checkpoint as ckpt_lib
from moma_jax.runs import state as train_state


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
  merged = _merge(configs.default_config().to_dict(),
                  renamed_fields.upgrade_saved(_as_tuples(saved)))
  return configs.validate(ml_collections.ConfigDict(merged))


@contextlib.contextmanager
def checkpoints(workdir: str):
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
  state, progress = restore_state(manager, step, {'params': target})
  return state['params'], progress


def restore_state(manager: ocp.CheckpointManager, step: int,
                  target: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
  """(state, progress) of checkpoint `step`: the subtrees of its 'state' item that
  `target` names ({'params'} or {'params', 'opt'}, sharded ShapeDtypeStructs), each
  array placed as its target leaf says; nothing else is read."""
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True),
      progress=ocp.args.JsonRestore()))
  if restored['progress'] is None:
    raise run_dir.RunDirError(f'{manager.directory}/{step} has no progress item')
  return restored['state'], dict(restored['progress'])


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
  config.mesh.update({**{a: 1 for a in mesh_lib.AXES}, **overrides})
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
  with checkpoints(workdir) as manager:
    steps = list(manager.all_steps())
  if not steps:
    raise run_dir.RunDirError(f'{workdir} has no complete checkpoint')
  step = max(steps) if step is None else step
  if step not in steps:
    raise run_dir.RunDirError(f'{workdir} has no checkpoint of step {step}; it has '
                              f'{", ".join(map(str, sorted(steps)))}')
  return workdir, config, step


def read_params(workdir: str, step: int | None, mesh: jax.sharding.Mesh
                ) -> tuple[str, ml_collections.ConfigDict, int, Any, dict[str, Any]]:
  """(absolute workdir, config, step, params, progress) of checkpoint `step` (None: the
  newest) of the run in `workdir`, its parameters placed on `mesh` by the training rules
  and its optimizer moments left on disk. Raises as `locate` does."""
  workdir, config, step, state, progress = read_state(
      workdir, step, lambda c: {'params': train_state.abstract_params(transformer.build(c),
                                                                      mesh)})
  return workdir, config, step, state['params'], progress


def read_state(workdir: str, step: int | None,
               target_of: Callable[[ml_collections.ConfigDict], Mapping[str, Any]]
               ) -> tuple[str, ml_collections.ConfigDict, int, Any, dict[str, Any]]:
  """(absolute workdir, config, step, state, progress) of checkpoint `step` (None: the
  newest): the subtrees `target_of(config)` names, placed as it says (`restore_state`).
  Raises as `locate` does."""
  workdir, config, step = locate(workdir, step)
  target = target_of(config)
  with checkpoints(workdir) as manager:
    state, progress = restore_state(manager, step, target)
  return workdir, config, step, state, progress
