"""A run directory's files, and how every file of the project is written.

  CONFIG_FILE, METRICS_FILE       the names `moma-train` writes into a workdir
  read_config_json(workdir)       the plain dict of its config.json (RunDirError if none)
  atomic_path(path)               write to a temporary file beside `path`, then rename

Every file the project writes whole (configs, results, tokenizers, tables, figures) goes
through `atomic_path`: a reader, or a run killed half-way, sees the old file or the new
one, never a part, and a failed write leaves no temporary file behind. No JAX here, so
tools that only read runs (moma-compare) start fast.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'


class RunDirError(Exception):
  """A directory that is not (or not yet) a training run; reported as one line."""


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
