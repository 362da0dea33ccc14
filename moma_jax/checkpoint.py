"""Checkpoints of a training run: Orbax CheckpointManager over three items.

  state     the arrays (params, optimizer state): `ocp.args.StandardSave`;
  progress  JSON: step, cumulative train_flops and tokens, non-finite counters and the
            data iterator position (`TrainIterator.get_state()`);
  config    JSON: the run's config, so a checkpoint says what made it.

Saves are asynchronous: `save` returns once the arrays are copied off the device and
the files are written in the background; `wait()` blocks until they are on disk. A save
interrupted by a kill never becomes a step (Orbax writes into a temporary folder and
renames it when done). A committed step that cannot be read back (a truncated file) is
moved aside into `checkpoints_corrupt/` with a warning, and the previous one is used.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any, Mapping

import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'checkpoints_corrupt'
ITEMS = ('state', 'progress', 'config')


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` holds at least one committed checkpoint step."""
  root = os.path.join(workdir, CHECKPOINT_DIR)
  return os.path.isdir(root) and any(name.isdigit() for name in os.listdir(root))


class Checkpoints:
  """The run's CheckpointManager: keeps the last `keep` steps (None: all)."""

  def __init__(self, workdir: str, *, keep: int | None = None):
    self.workdir = os.path.abspath(workdir)
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
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target_state), progress=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['progress'])

  def restore_latest(self, target_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, progress) of the newest readable step; None if there is none.
    Unreadable newer steps are moved aside on the way."""
    while (step := self.manager.latest_step()) is not None:
      try:
        return (step, *self.restore(step, target_state))
      except Exception as e:  # pylint: disable=broad-except
        # Whatever broke the read (truncated file, missing metadata), the step is unusable.
        self._move_aside(step, e)
    return None

  def _move_aside(self, step: int, error: Exception) -> None:
    src = os.path.join(self.directory, str(step))
    dst_root = os.path.join(self.workdir, CORRUPT_DIR)
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, f'{step}.{time.strftime("%Y%m%d-%H%M%S")}')
    shutil.move(src, dst)
    reason = (str(error).splitlines() or [''])[0][:200]
    print(f'warning: checkpoint step {step} cannot be read ({type(error).__name__}: '
          f'{reason}); moved it to {dst} and using the previous one', file=sys.stderr,
          flush=True)
    self.manager.reload()

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
