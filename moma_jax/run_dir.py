"""A run directory's files, and how every file of the project is written.

  CONFIG_FILE, METRICS_FILE       the names `moma-train` writes into a workdir
  read_config_json(workdir)       the plain dict of its config.json (RunDirError if none)
  atomic_path(path)               write to a temporary file beside `path`, then rename
  StorageError, storage_errors    a write that failed for lack of space or permission,
                                  said as one line naming the path

Every file the project writes whole (configs, results, tokenizers, tables, figures) goes
through `atomic_path`: a reader, or a run killed half-way, sees the old file or the new
one, never a part, and a failed write leaves no temporary file behind. No JAX here, so
tools that only read runs (moma-compare) start fast.

A full disk (or quota, a read-only mount, a missing permission, the file size limit) is
not a bug of the program: the user frees space and reruns the same command, which
resumes. `storage_errors(path)` turns such a failure into `StorageError`, a UsageError,
so every command reports it as one line and exit code 2 (moma_jax/cli/command.py) like
the other errors the user fixes outside the program, instead of a traceback. Orbax's
array writer (tensorstore) wraps the OS error in its own text, e.g. `RESOURCE_EXHAUSTED:
... Failed to write 510381 bytes to file 5: No space left on device
[os_error_code='28']`; `storage_errno` reads both forms.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from typing import Any, Callable, Iterator

from moma_jax import usage

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'


class RunDirError(Exception):
  """A directory that is not (or not yet) a training run; reported as one line."""


# Why a write fails that the user, not the program, must fix; and what to do about it.
STORAGE_FIXES = {errno.ENOSPC: 'free space', errno.EDQUOT: 'free space or raise the quota',
                 errno.EFBIG: 'raise the file size limit (ulimit -f)',
                 errno.EROFS: 'make it writable', errno.EACCES: 'make it writable'}
# tensorstore's status text names the OS error by number.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


class StorageError(usage.UsageError):
  """Writing `path` failed for lack of space or permission; one line, exit code 2.

  Exit code 2 as for every error the user fixes outside the program (design §7): nothing
  written before is damaged and rerunning the same command after the fix resumes.
  """

  def __init__(self, code: int, path: str, *, detail: str = '',
               then: str = 'rerun the same command'):
    """code: the errno (a key of STORAGE_FIXES); detail: what is still good, e.g. the
    last checkpoint; then: what rerunning does."""
    reason = os.strerror(code)
    self.errno, self.path = code, path
    super().__init__(f'{reason[:1].lower()}{reason[1:]} writing {path}; '
                     + (f'{detail}; ' if detail else '')
                     + f'{STORAGE_FIXES.get(code, "fix it")} and {then}')


def storage_errno(error: BaseException | None) -> int | None:
  """The errno of STORAGE_FIXES behind `error`, or None.

  Looks at the error and at what it was raised from or during: an OSError's errno, else
  tensorstore's `os_error_code='28'`, else the OS's own words ('No space left on device')
  in the message.
  """
  seen: list[BaseException] = []
  while error is not None and not any(error is e for e in seen):
    if isinstance(error, OSError) and error.errno in STORAGE_FIXES:
      return error.errno
    text = str(error)
    match = _OS_ERROR_CODE.search(text)
    if match and int(match.group(1)) in STORAGE_FIXES:
      return int(match.group(1))
    for code in STORAGE_FIXES:
      if os.strerror(code) in text:
        return code
    seen.append(error)
    # `raise ... from None` says the error it was raised during is not its cause.
    error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
  return None


@contextlib.contextmanager
def storage_errors(path: str, *, detail: str | Callable[[], str] = '',
                   then: str = 'rerun the same command') -> Iterator[None]:
  """Re-raises a storage failure of the block as StorageError naming `path`; any other
  error goes on as it is. detail: StorageError's, or a function that says it (called
  only on a failure)."""
  try:
    yield
  except usage.UsageError:
    raise           # said already (a StorageError, a busy workdir)
  except Exception as e:  # pylint: disable=broad-except
    code = storage_errno(e)
    if code is None:
      raise
    raise StorageError(code, path, detail=detail() if callable(detail) else detail,
                       then=then) from e


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path in `path`'s folder (same suffix, so writers that pick a
  format by extension still do); renames it onto `path` when the block succeeds, and
  removes it whatever happens."""
  folder, name = os.path.split(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{name}.', suffix=os.path.splitext(name)[1])
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, value: Any) -> None:
  """`value` as indented, key-sorted JSON, atomically."""
  with atomic_path(path) as tmp, open(tmp, 'w') as f:
    json.dump(value, f, indent=1, sort_keys=True)


def read_config_json(workdir: str) -> dict[str, Any]:
  """The plain dict in `workdir/config.json`; RunDirError when absent or unreadable."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise RunDirError(f'{workdir} is not a training run: no {CONFIG_FILE}')
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise RunDirError(f'cannot read {path}: {e}') from e
  if not isinstance(saved, dict):
    raise RunDirError(f'cannot read {path}: not a JSON object')
  return saved
