"""One writer per run directory: the lock a run holds on its workdir.

  with run_lock.hold(workdir, 'moma-train', enabled=process_index == 0):
    ...                       # write checkpoints, metrics, results
  read_holder(workdir)        # the holder recorded in the lock file, or None
  scope()                     # releases the locks taken inside it (a command's main)

Two runs writing one workdir corrupt it quietly: both append to metrics.jsonl and
Orbax deletes the other's checkpoint steps. So a run holds `WORKDIR/.lock` while it
writes: an OS lock on a small JSON file naming the holder (host, pid, program, since
when). A second holder gets `WorkdirBusyError` (a UsageError: one line, exit code 2)
naming the first; releasing removes the file.

The OS lock is a POSIX record lock (`fcntl.lockf`), because
- the OS drops it when its holder dies, however it dies (SIGKILL, the OOM killer; on
  NFSv4 a lost client's locks go when the server's lease runs out, ~90 s): a killed run
  never blocks its rerun;
- it is the lock that crosses hosts: NFSv4 has it in the protocol (NFSv3 through lockd),
  as do Lustre and GPFS. flock() is emulated with it on Linux NFS and missing on some
  cluster file systems; a pid file alone outlives a killed holder and cannot tell whether
  a holder on another host is alive.
Its catch: a POSIX lock belongs to the process, and closing any descriptor of the file
drops it. So this module keeps one descriptor per held workdir, never opens a file it
holds again (`read_holder` answers from memory), and refuses a second hold of a workdir
this process holds already.

A lock file whose OS lock is free was left by a holder that died: it is taken over with
one warning line naming that holder. The OS lock decides, not the pid in the file: a
locked file whose pid looks dead may belong to a holder that has not written its name
yet. Only where the file system refuses locks (ENOLCK: NFS without lockd, some FUSE
mounts) does the file decide: a holder on this host whose pid is gone is stale; one on
another host cannot be checked and counts as alive (the error says how to clear it).

Of a multi-process run only process 0 holds the lock (`enabled=False` elsewhere). The
lock never touches anything in the workdir but `.lock`; `hold` creates a missing
workdir and removes it again on release if nothing was written there. No JAX here.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Iterator

from moma_jax import run_dir
from moma_jax import usage

LOCK_FILE = '.lock'
_BUSY = (errno.EACCES, errno.EAGAIN)
# What lockf raises on a file system without locks.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
# A holder that has just taken the lock may not have written its name yet: how long to
# wait for it before naming whoever the file says.
_NAME_WAIT_S = 1.0

# (st_dev, st_ino) of each workdir this process holds -> its lock.
_held: dict[tuple[int, int], 'WorkdirLock'] = {}
_held_mutex = threading.RLock()


class WorkdirBusyError(usage.UsageError):
  """Another run holds the workdir; reported as one line, exit code 2."""

  def __init__(self, workdir: str, holder: dict[str, Any] | None, hint: str = ''):
    self.workdir, self.holder = workdir, holder
    super().__init__(
        f'{workdir} is in use by {describe(holder)}; one run writes a workdir at a time: '
        f'wait for it to end, stop it, or use another workdir{hint}')


def describe(holder: dict[str, Any] | None) -> str:
  """'moma-train (pid 123 on host-a, since 2025-01-01 12:00:00 UTC)' from lock info."""
  if not holder:
    return 'another process (it has not written its name yet)'
  return (f'{holder.get("program", "?")} (pid {holder.get("pid", "?")} on '
          f'{holder.get("host", "?")}, since {holder.get("since", "?")})')


def _key(workdir: str) -> tuple[int, int]:
  st = os.stat(workdir)
  return st.st_dev, st.st_ino


def _read_info(fd: int) -> dict[str, Any] | None:
  """The JSON object in the open file, None if empty or not (yet) whole."""
  try:
    info = json.loads(os.pread(fd, 1 << 16, 0) or b'null')
  except (OSError, ValueError):
    return None
  return info if isinstance(info, dict) else None


def _pid_gone(holder: dict[str, Any] | None) -> bool:
  """Whether the holder is a process of this host that no longer exists."""
  if not holder or holder.get('host') != socket.gethostname():
    return False
  try:
    os.kill(int(holder['pid']), 0)
  except ProcessLookupError:
    return True
  except (OSError, KeyError, TypeError, ValueError):
    return False     # alive but not ours (EPERM), or no pid recorded
  return False


def _is_file_of(fd: int, path: str) -> bool:
  """Whether `path` is still the open file `fd` (a releasing holder removes it)."""
  try:
    a, b = os.fstat(fd), os.stat(path)
  except FileNotFoundError:
    return False
  return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class WorkdirLock:
  """The lock of one workdir; `held` while this process holds it. A context manager
  that releases it on exit (`hold` acquires)."""

  def __init__(self, workdir: str, program: str):
    self.workdir = os.path.abspath(workdir)
    self.program = program
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.info: dict[str, Any] | None = None       # what the file says while held
    self._fd: int | None = None
    self._key: tuple[int, int] | None = None
    self._made: list[str] = []       # the folders `hold` made, the workdir first

  @property
  def held(self) -> bool:
    return self._fd is not None

  def __enter__(self) -> 'WorkdirLock':
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock; WorkdirBusyError if another holder has it, StorageError if the
    workdir cannot be written."""
    if self.held:
      return self
    try:
      with run_dir.storage_errors(self.path):
        self._make_workdir()
        with _held_mutex:
          key = _key(self.workdir)
          if key in _held:      # this process: opening the file again would drop its lock
            raise WorkdirBusyError(self.workdir, _held[key].info)
          fd, previous = self._lock()
          try:
            self._write_info(fd)
          except BaseException:
            self.info = None
            with contextlib.suppress(OSError):
              os.unlink(self.path)
            os.close(fd)
            raise
          self._fd, self._key = fd, key
          _held[key] = self
    except BaseException:
      self._unmake_workdir()
      raise
    if previous is not None:
      who = describe(previous) if previous else 'a process that left no name'
      print(f'warning: taking over the lock of {self.workdir} from {who}, which is gone',
            file=sys.stderr, flush=True)
    return self

  def _make_workdir(self) -> None:
    missing, folder = [], self.workdir
    while not os.path.exists(folder):
      missing.append(folder)
      folder = os.path.dirname(folder)
    try:
      os.makedirs(self.workdir, exist_ok=True)
    except FileExistsError:
      raise usage.UsageError(f'{self.workdir} is a file, not a directory') from None
    except OSError as e:
      if run_dir.storage_errno(e) is not None:
        raise                 # said as a StorageError by acquire
      raise usage.UsageError(f'cannot create {self.workdir} ({e.strerror or e})') from e
    self._made = missing

  def _lock(self) -> tuple[int, dict[str, Any] | None]:
    """(descriptor of the locked file, the stale holder it names or None)."""
    for _ in range(100):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
      try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        try:
          if e.errno in _BUSY:
            raise WorkdirBusyError(self.workdir, self._name_of_holder(fd)) from None
          if e.errno not in _NO_LOCKS:
            raise
          holder = _read_info(fd)
          if holder and not _pid_gone(holder):
            raise WorkdirBusyError(self.workdir, holder, hint=(
                f' (this file system has no locks: if that run is gone, remove '
                f'{self.path})')) from None
          return os.dup(fd), holder
        finally:
          os.close(fd)
      if _is_file_of(fd, self.path):
        # Locked, so whoever wrote here is gone. An empty file is the one just made (or
        # one whose holder died before naming itself): nothing to warn about.
        return fd, (_read_info(fd) or ({} if os.fstat(fd).st_size else None))
      os.close(fd)   # the holder released (removed the file) as we opened it: again
    raise WorkdirBusyError(self.workdir, None)

  def _name_of_holder(self, fd: int) -> dict[str, Any] | None:
    deadline = time.monotonic() + _NAME_WAIT_S
    while True:
      holder = _read_info(fd)
      if (holder and not _pid_gone(holder)) or time.monotonic() > deadline:
        return holder
      time.sleep(0.05)

  def _write_info(self, fd: int) -> None:
    self.info = dict(host=socket.gethostname(), pid=os.getpid(), program=self.program,
                     since=time.strftime('%Y-%m-%d %H:%M:%S %Z'), time=time.time())
    data = json.dumps(self.info).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)

  def release(self) -> None:
    """Removes the lock file, then drops the lock (in that order: a waiting process that
    opened the old file sees it gone and tries again). Idempotent."""
    with _held_mutex:
      if self._fd is None:
        return
      _held.pop(self._key, None)
      fd, self._fd, self.info = self._fd, None, None
      with contextlib.suppress(OSError):
        if _is_file_of(fd, self.path):
          os.unlink(self.path)
      os.close(fd)
      self._unmake_workdir()

  def _unmake_workdir(self) -> None:
    """Removes the folders `hold` made, as far as nothing was written there."""
    made, self._made = self._made, []
    with contextlib.suppress(OSError):
      for folder in made:
        os.rmdir(folder)


def hold(workdir: str, program: str, *, enabled: bool = True) -> WorkdirLock:
  """The lock of `workdir`, acquired for `program` (the command's name) unless
  `enabled` is False (processes other than 0 of a multi-process run); release it with
  `with`, `release()` or `scope()`.

  Raises:
    WorkdirBusyError: another process (or this one) holds it.
    StorageError: the lock file cannot be written (read-only, no space).
  """
  lock = WorkdirLock(workdir, program)
  return lock.acquire() if enabled else lock


def read_holder(workdir: str) -> dict[str, Any] | None:
  """What `workdir`'s lock file says (host, pid, program, since, time), or None if
  there is none. It may be stale: only taking the lock tells."""
  with _held_mutex:
    with contextlib.suppress(OSError):
      mine = _held.get(_key(workdir))
      if mine is not None:
        return dict(mine.info)
    try:
      fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
      return None
    try:
      return _read_info(fd)
    finally:
      os.close(fd)


@contextlib.contextmanager
def scope() -> Iterator[None]:
  """Releases, when the block ends however it ends, the locks this process took inside
  it and still holds: for a command that takes a lock part-way through its main."""
  with _held_mutex:
    before = set(_held)
  try:
    yield
  finally:
    with _held_mutex:
      taken = [lock for key, lock in _held.items() if key not in before]
    for lock in taken:
      lock.release()
