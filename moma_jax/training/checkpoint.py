"""Checkpoints of a training run: Orbax CheckpointManager over three items.

  state     the arrays (params, optimizer state): `ocp.args.StandardSave`;
  progress  JSON: step, cumulative train_flops and tokens, non-finite counters and the
            data iterator position (`TrainIterator.get_state()`);
  config    JSON: the run's config, so a checkpoint says what made it.

Saves are asynchronous: `save` returns once the arrays are copied off the device and
the files are written in the background; `wait()` blocks until they are on disk. A save
interrupted by a kill never becomes a step (Orbax writes into a temporary folder and
renames it when done).

On resume a step is unusable when it cannot be read back (a truncated array file, a
missing item or metadata file, an empty step directory) or was written by another run
(its saved config differs where the trainer says it must agree). Unusable steps newer
than the newest usable one are moved aside into `checkpoints_corrupt/`, one warning line
each, and the run resumes from that one. When no step is usable, `CheckpointError` names
them and nothing is moved, so that rerunning never silently starts the run over.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any, Callable, Mapping

import orbax.checkpoint as ocp

from moma_jax import usage

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'checkpoints_corrupt'
ITEMS = ('state', 'progress', 'config')


class CheckpointError(Exception):
  """A workdir whose checkpoints are all unusable; reported as one line, exit code 2."""


def _step_dirs(directory: str) -> list[int]:
  """Every step-named folder under `directory`, complete or not."""
  if not os.path.isdir(directory):
    return []
  return [int(n) for n in os.listdir(directory)
          if n.isdigit() and os.path.isdir(os.path.join(directory, n))]


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` holds at least one checkpoint step (readable or not: a run whose
  checkpoints are all bad must say so, not start over)."""
  return bool(_step_dirs(os.path.join(workdir, CHECKPOINT_DIR)))


class Checkpoints:
  """The run's CheckpointManager: keeps the last `keep` steps (None: all)."""

  def __init__(self, workdir: str, *, keep: int | None = None, primary: bool = True):
    """primary: whether this process moves unusable steps aside (one process of a
    multi-process run does; the others only reload)."""
    self.workdir = os.path.abspath(workdir)
    self.primary = primary
    self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def save(self, step: int, state: Any, progress: Mapping[str, Any],
           config: Mapping[str, Any]) -> bool:
    """Starts saving step `step` unless it is saved already; True if it did. (The caller
    decides which steps: Orbax alone would also save the first step it sees.)"""
    if step in self.manager.all_steps():
      return False
    return self.manager.save(
        step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            progress=ocp.args.JsonSave(dict(progress)),
            config=ocp.args.JsonSave(dict(config))))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore(self, step: int, target_state: Any) -> tuple[Any, dict[str, Any]]:
    """(state, progress) of `step`.

    target_state: a pytree of the state's structure, shapes and dtypes (concrete or
    `jax.ShapeDtypeStruct` leaves); Orbax needs it to restore (a bare restore returns
    nothing useful).
    """
    state, progress, _ = self._read(step, target_state)
    return state, progress

  def _read(self, step: int, target_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target_state), progress=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore()))
    if restored['progress'] is None or restored['config'] is None:
      raise ValueError('an item is missing')
    return restored['state'], dict(restored['progress']), dict(restored['config'])

  def restore_latest(self, target_state: Any,
                     accept: Callable[[dict[str, Any]], str | None] | None = None,
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, progress) of the newest usable step; None if there is no step.

    accept: given a step's saved config, None if this run may resume from it, else why
    not (one line). Unusable newer steps are moved aside (one warning line each) once a
    usable one is found; with none usable, CheckpointError and nothing is moved.
    """
    complete = set(self.manager.all_steps())
    unusable = []
    for step in sorted(set(_step_dirs(self.directory)) | complete, reverse=True):
      if step not in complete:
        unusable.append((step, 'not a complete checkpoint (no Orbax metadata)'))
        continue
      try:
        state, progress, saved_config = self._read(step, target_state)
      except Exception as e:  # pylint: disable=broad-except
        # Whatever broke the read (truncated file, missing item), the step is unusable.
        unusable.append((step, usage.first_line(e, with_type=True)))
        continue
      reason = accept(saved_config) if accept is not None else None
      if reason is not None:
        unusable.append((step, reason))
        continue
      for bad, why in unusable:
        self._move_aside(bad, why)
      return step, state, progress
    if unusable:
      raise CheckpointError(
          f'no usable checkpoint in {self.directory}: ' + '; '.join(
              f'step {bad}: {why}' for bad, why in unusable) +
          '; move that folder aside to start the run over')
    return None

  def _move_aside(self, step: int, reason: str) -> None:
    src = os.path.join(self.directory, str(step))
    dst_root = os.path.join(self.workdir, CORRUPT_DIR)
    dst = os.path.join(dst_root, f'{step}.{time.strftime("%Y%m%d-%H%M%S")}')
    if self.primary:
      os.makedirs(dst_root, exist_ok=True)
      shutil.move(src, dst)
      print(f'warning: checkpoint step {step} cannot be used ({reason}); moved it to '
            f'{dst} and using the previous one', file=sys.stderr, flush=True)
    self.manager.reload()

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
