"""Checkpoints of a training run: Orbax CheckpointManager over three items.

  state     the arrays (params, optimizer state): `ocp.args.StandardSave`;
  progress  JSON: step, cumulative train_flops and tokens, non-finite counters and the
            data iterator position (`TrainIterator.get_state()`);
  config    JSON: the run's config, so a checkpoint says what made it.

Saves are asynchronous: `save` returns once the arrays are copied off the device and
the files are written in the background; `wait()` blocks until they are on disk. A save
interrupted by a kill never becomes a step (Orbax writes into a temporary folder and
renames it when done).

A save that fails for lack of space or permission (a full disk, a quota, a read-only
mount, the file size limit) ends as one `run_dir.StorageError` naming the step's folder
and the last good checkpoint: `no space left on device writing RUN/checkpoints/30; the
last good checkpoint is step 20 in RUN/checkpoints; free space and rerun the same
command to resume`. Orbax 0.12 writes in background threads: the error (tensorstore's
`ValueError('RESOURCE_EXHAUSTED: ... [os_error_code=\'28\']')`, or an OSError from its
JSON and metadata writers) surfaces at the next `save`, `wait` or `close`, after Orbax
has logged it once per thread with its traceback (absl, ERROR), and asyncio reports
each of its other failed writes when they are garbage collected, as late as at exit.
Those records are held while a save is in flight and dropped when its outcome is a
StorageError, which says it in one line (asyncio's late reports of it too); any other
outcome passes them on. The failed step stays a temporary folder
(`30.orbax-checkpoint-tmp`) that is never taken for a step and is removed when the run
resumes. `close()` does not raise a failure already raised, nor one met while another
error is on its way out (a `finally`): the first error is the one to read.

On resume a step is unusable when it cannot be read back (a truncated array file, a
missing item or metadata file, an empty step directory) or was written by another run
(its saved config differs where the trainer says it must agree). Unusable steps newer
than the newest usable one are moved aside into `checkpoints_corrupt/`, one warning line
each, and the run resumes from that one. When no step is usable, `CheckpointError` names
them and nothing is moved, so that rerunning never silently starts the run over.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import orbax.checkpoint as ocp

from moma_jax import run_dir
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


class _HeldOrbaxErrors(logging.Filter):
  """Holds the ERROR records of Orbax (absl logger) and of asyncio (the event loops of
  Orbax's writer threads) while a save is in flight."""

  LOGGERS = ('absl', 'asyncio')

  def __init__(self):
    super().__init__()
    self._records: list[logging.LogRecord] = []
    self._mutex = threading.Lock()

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or (
        record.name == 'absl' and f'{os.sep}orbax{os.sep}' not in record.pathname):
      return True
    with self._mutex:
      self._records.append(record)
    return False

  def start(self) -> None:
    for name in self.LOGGERS:
      if self not in logging.getLogger(name).filters:
        logging.getLogger(name).addFilter(self)

  def stop(self, drop: bool) -> None:
    """Stops holding; passes the held records on unless `drop`."""
    for name in self.LOGGERS:
      logging.getLogger(name).removeFilter(self)
    with self._mutex:
      records, self._records = self._records, []
    for record in [] if drop else records:
      logging.getLogger(record.name).callHandlers(record)


class _SaidStorageErrors(logging.Filter):
  """Drops asyncio's late reports of a storage failure already raised.

  Orbax gathers the writes of a step and retrieves the first failure only: the other
  failed tasks are reported ('Task exception was never retrieved', with a traceback
  each, dozens for a model) when they are garbage collected, as late as at exit.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return error is None or run_dir.storage_errno(error) is None


_SAID_STORAGE_ERRORS = _SaidStorageErrors()


class _LateCallbacks:
  """Drops the unraisable 'Event loop is closed' errors of a failed save's other writes.

  When a save fails, Orbax's event loop ends with the first failure while tensorstore
  still completes the step's other writes; their callbacks into the closed loop raise
  RuntimeError('Event loop is closed'), reported through `sys.unraisablehook` with a
  traceback each, some before the failure reaches the caller. Installed with the first
  save; anything else goes to the hook it replaced.
  """

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable) -> None:
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
      self.previous(unraisable)

  @classmethod
  def install(cls) -> None:
    if not isinstance(sys.unraisablehook, cls):
      sys.unraisablehook = cls(sys.unraisablehook)


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
    self.failed: run_dir.StorageError | None = None   # the storage failure raised
    self._in_flight: int | None = None                # the step a save may be writing
    self._orbax_errors = _HeldOrbaxErrors()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=True, cleanup_tmp_directories=True)
    with run_dir.storage_errors(self.directory):
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=ITEMS)

  def __enter__(self) -> 'Checkpoints':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def save(self, step: int, state: Any, progress: Mapping[str, Any],
           config: Mapping[str, Any]) -> bool:
    """Starts saving step `step` unless it is saved already; True if it did. (The caller
    decides which steps: Orbax alone would also save the first step it sees.)

    Raises:
      run_dir.StorageError: this save, or the previous one, failed for lack of space or
        permission.
    """
    if self.failed is not None:
      raise self.failed
    if step in self.manager.all_steps():
      return False
    self.wait()        # so that a failure of the previous save is said as that step's
    _LateCallbacks.install()
    with self._writing(step):
      if self.primary:
        # Orbax makes the step's folder in one thread (of process 0) while the others
        # wait up to 300 s for it: one that cannot be made would stall the run so long.
        os.rmdir(tempfile.mkdtemp(dir=self.directory, prefix='.write_probe_'))
      started = self.manager.save(
          step, force=True, args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              progress=ocp.args.JsonSave(dict(progress)),
              config=ocp.args.JsonSave(dict(config))))
    self._in_flight = step if started else None
    if not started:
      self._orbax_errors.stop(drop=False)
    return started

  @contextlib.contextmanager
  def _writing(self, step: int) -> Iterator[None]:
    """Orbax's work on `step`: a storage failure becomes `self.failed`, raised."""
    self._orbax_errors.start()
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      code = run_dir.storage_errno(e)
      self._orbax_errors.stop(drop=code is not None)
      self._in_flight = None
      if code is None:
        raise
      self.failed = run_dir.StorageError(
          code, os.path.join(self.directory, str(step)), detail=self.last_good(step),
          then='rerun the same command to ' + (
              'resume' if self._good_steps(step) else 'start again'))
      if _SAID_STORAGE_ERRORS not in logging.getLogger('asyncio').filters:
        logging.getLogger('asyncio').addFilter(_SAID_STORAGE_ERRORS)
      raise self.failed from e

  def _good_steps(self, failed: int | None = None) -> list[int]:
    # On disk, not Orbax's list: a save drops the steps it will delete from that list
    # when it starts, though they are deleted only once it has succeeded.
    return [s for s in _step_dirs(self.directory) if s != failed]

  def last_good(self, failed: int | None = None) -> str:
    """Which checkpoint a rerun resumes from, for an error line: 'the last good
    checkpoint is step 20 in RUN/checkpoints'. failed: a step that is not one."""
    good = self._good_steps(failed)
    return (f'the last good checkpoint is step {max(good)} in {self.directory}' if good
            else f'no checkpoint in {self.directory} is complete yet')

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
    """Blocks until every started save is on disk; StorageError if it failed."""
    if self.failed is not None:
      raise self.failed
    if self._in_flight is None:
      self.manager.wait_until_finished()
      return
    with self._writing(self._in_flight):
      self.manager.wait_until_finished()
    self._in_flight = None
    self._orbax_errors.stop(drop=False)

  def close(self) -> None:
    """Waits for the started save, then closes. A storage failure is raised unless it
    was raised already or another error is on its way out (close in a `finally`)."""
    other = sys.exc_info()[1]
    try:
      if self.failed is None:
        self.wait()
    except run_dir.StorageError as e:
      if other is None:
        raise
      if not isinstance(other, run_dir.StorageError):
        print(f'warning: {e}', file=sys.stderr, flush=True)
    finally:
      try:
        self.manager.close()
      except Exception as e:  # pylint: disable=broad-except
        # Orbax raises a failed save again from each of its layers: say it once.
        code = run_dir.storage_errno(e)
        if code is None:
          raise
        if self.failed is None and other is None:
          raise run_dir.StorageError(code, self.directory) from e
      finally:
        self._orbax_errors.stop(drop=self.failed is not None)
