"""The trainer's checks: everything a user can get wrong, before anything is written.

`check_train_config` validates `train.*`; `check_workdir` refuses a DIR that is a file or
holds a run whose model, sequence length, batch or routing group differs (resuming it
would load parameters or data positions of another shape).
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


def check_train_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for `train.*` values the trainer cannot run."""
  t = config.train
  if not isinstance(t.lr, (int, float)) or not t.lr > 0:
    raise configs.ConfigError('train.lr', f'must be > 0, got {t.lr!r}')
  if t.schedule not in ('linear', 'cosine'):
    raise configs.ConfigError('train.schedule', f"must be 'linear' or 'cosine', got {t.schedule!r}")
  if not isinstance(t.warmup, int) or t.warmup < 0:
    raise configs.ConfigError('train.warmup', f'must be an integer >= 0, got {t.warmup!r}')
  if t.weight_decay < 0:
    raise configs.ConfigError('train.weight_decay', f'must be >= 0, got {t.weight_decay}')
  if not t.clip > 0:
    raise configs.ConfigError('train.clip', f'must be > 0, got {t.clip}')
  for name in ('log_every', 'eval_every', 'ckpt_every', 'keep', 'max_nonfinite'):
    if not isinstance(t[name], int) or isinstance(t[name], bool) or t[name] <= 0:
      raise configs.ConfigError(f'train.{name}', f'must be a positive integer, got {t[name]!r}')
  if not isinstance(t.prefetch, int) or isinstance(t.prefetch, bool) or t.prefetch < 0:
    raise configs.ConfigError('train.prefetch', f'must be an integer >= 0, got {t.prefetch!r}')
  if t.eval_max_batches is not None and t.eval_max_batches <= 0:
    raise configs.ConfigError('train.eval_max_batches', f'must be positive or None, got '
                              f'{t.eval_max_batches}')
  micro, rem = divmod(t.batch_size, t.grad_accum)
  if rem or micro % config.routing.group_size:
    raise configs.ConfigError('train.grad_accum', f'batch {t.batch_size} / {t.grad_accum} '
                              'micro-batches must be a multiple of routing.group_size='
                              f'{config.routing.group_size}')


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
