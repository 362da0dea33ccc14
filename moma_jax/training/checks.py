"""The trainer's checks: everything a user can get wrong, before anything is written.

`train.*` itself is validated with the rest of the config (moma_jax/configs/train.py).
`check_workdir` refuses a DIR that is a file or holds a run whose model, sequence length,
batch or routing group differs (resuming it would load parameters or data positions of
another shape).
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from moma_jax import configs
from moma_jax import renamed_fields
from moma_jax import run_dir
from moma_jax import usage

# Fields that must agree with the run already in a workdir for it to be resumed.
_RESUME_KEYS = ('model', 'data.seq_len', 'train.batch_size', 'routing.group_size')


def to_plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as JSON-ready Python (tuples become lists)."""
  return json.loads(config.to_json())


def resume_mismatch(before: dict[str, Any], now: dict[str, Any]) -> str | None:
  """The first of `_RESUME_KEYS` on which two plain configs (`to_plain`) differ, or None.

  Used on a workdir's `config.json` and on each checkpoint's saved config alike."""
  return configs.first_difference(renamed_fields.upgrade_saved(before), now, _RESUME_KEYS)


def check_workdir(workdir: str | None, config: ml_collections.ConfigDict) -> str:
  """The absolute workdir; UsageError if it cannot hold this run. Writes nothing."""
  if not workdir:
    raise usage.UsageError('--workdir DIR is required')
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise usage.UsageError(f'--workdir: {workdir} is a file, not a directory')
  if os.path.exists(os.path.join(workdir, run_dir.CONFIG_FILE)):
    try:
      key = resume_mismatch(run_dir.read_config_json(workdir), to_plain(config))
    except run_dir.RunDirError as e:
      raise usage.UsageError(f'--workdir: {e}; it is not a run this config can resume') from e
    if key is not None:
      raise usage.UsageError(f'--workdir: {workdir} holds a run with another {key}; '
                           'resume it with its own config or choose a new directory')
  return workdir
