"""Where a training run's numbers go: `metrics.jsonl`, TensorBoard events, stderr.

`metrics.jsonl` holds one JSON object per line (docs/design.md §6). Training rows: `step`,
`train_flops` (cumulative training FLOPs, flops.count's per-modality training FLOPs per
token times the non-padding target tokens of that modality), `tokens` (cumulative
non-padding target tokens), `loss`, `loss/{modality}`, `tokens_per_sec`, `lr`,
`nonfinite_skipped`, the `route/...` statistics and where the time went since the
previous row (`time/step`, `time/data_wait`, `time/eval`, `time/checkpoint`, seconds:
moma_jax/training/trainer.py). Evaluation rows: `step`,
`train_flops`, `eval/loss`, `eval/loss/{modality}`, `eval/{dataset}/loss`. Every value is
a scalar: a vector statistic [K] is written as K keys `name/0` ... `name/{K-1}`, and
anything of higher rank is left out.

On resume, `MetricsLog(workdir, resume_step=s)` first drops the rows past step s, so
the file reads as one uninterrupted run; TensorBoard is told the same (`purge_step`).

A write that fails for lack of space or permission raises `run_dir.StorageError` naming
the file (one line, exit code 2); a row cut off by it is dropped on resume like one cut
off by a kill. TensorBoard events are written in the caller's thread
(moma_jax/training/tb_events.py), where such an error can be raised. `close()` is quiet
about a failure already raised, or met while another error is on its way out.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from moma_jax import run_dir
from moma_jax.training import tb_events

METRICS_FILE = run_dir.METRICS_FILE
TENSORBOARD_DIR = 'tensorboard'


def scalars(metrics: Mapping[str, Any]) -> dict[str, float | int]:
  """Flattens metric values (host numpy or Python numbers) into JSON scalars.

  0-d values stay as they are (ints as int, floats as float); a vector [K] becomes the
  keys `name/0` ... `name/{K-1}`; higher ranks are dropped (too big for a row).
  """
  out: dict[str, float | int] = {}
  for key, value in metrics.items():
    arr = np.asarray(value)
    if arr.ndim == 0:
      out[key] = arr.item()
    elif arr.ndim == 1:
      for i, v in enumerate(arr.tolist()):
        out[f'{key}/{i}'] = v
  return out


def read_rows(workdir: str) -> list[dict[str, Any]]:
  """Every row of `workdir/metrics.jsonl` (an absent file has none). A last line without
  its newline is not a row yet: a running trainer is writing it (a reader of a live run
  can see part of it), or a kill cut it off (`_truncate` drops it on resume)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith('\n') and line.strip()]


def _truncate(path: str, last_step: int) -> int:
  """Drops the rows of `path` whose step is past `last_step`; returns how many."""
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  # A line cut off by a kill is not valid JSON: it goes too.
  keep = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if row.get('step', 0) <= last_step:
      keep.append(line if line.endswith('\n') else line + '\n')
  if len(keep) != len(lines):
    # Atomic: a kill here leaves the old or the new file.
    with run_dir.atomic_path(path) as tmp, open(tmp, 'w') as f:
      f.writelines(keep)
  return len(lines) - len(keep)


class MetricsLog:
  """Appends rows to metrics.jsonl and TensorBoard; writes the progress line.

  Only process 0 writes (`enabled=False` elsewhere makes every method a no-op).
  """

  def __init__(self, workdir: str, *, resume_step: int = 0, total_steps: int,
               enabled: bool = True, last_good: Callable[[], str] | None = None):
    """last_good: what is still good when a write fails, for its error line (the
    trainer passes `Checkpoints.last_good`)."""
    self.enabled = enabled
    self.total_steps = total_steps
    self.failed: run_dir.StorageError | None = None
    self._last_good = last_good
    self._pace_from: tuple[int, float] | None = None    # (step, time) the ETA counts from
    if not enabled:
      return
    self.path = os.path.join(workdir, METRICS_FILE)
    with self._storage(self.path):
      self.dropped = _truncate(self.path, resume_step)
      self._file = open(self.path, 'a')
    tb_dir = os.path.join(workdir, TENSORBOARD_DIR)
    try:
      with self._storage(tb_dir):
        # purge_step makes TensorBoard hide the abandoned steps' events past resume_step.
        self._tb = tb_events.EventFile(
            tb_dir, purge_step=resume_step + 1 if resume_step else None)
    except BaseException:
      self._file.close()
      raise

  @contextlib.contextmanager
  def _storage(self, path: str) -> Iterator[None]:
    """A storage failure writing `path` becomes `self.failed`, raised."""
    try:
      with run_dir.storage_errors(path, detail=self._last_good or ''):
        yield
    except run_dir.StorageError as e:
      self.failed = e
      raise

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Appends one row {'step': step, **scalars(metrics)}; returns it."""
    row = {'step': int(step), **scalars(metrics)}
    if not self.enabled:
      return row
    # JSON has no NaN/Infinity: a non-finite value is written as null.
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in row.items()}
    with self._storage(self.path):
      self._file.write(json.dumps(clean) + '\n')
      self._file.flush()
    with self._storage(self._tb.path):
      # A non-finite value is in the JSON row (as null), not in TensorBoard's curves.
      self._tb.add_scalars(step, {k: v for k, v in clean.items()
                                  if k != 'step' and isinstance(v, (int, float))})
    return row

  def progress(self, step: int, loss: float, tokens_per_sec: float,
               data_wait: float = 0.0) -> None:
    """One stderr line: step, loss, tokens/s, the share of training time spent waiting
    for data (`data_wait`, 0..1: high means input-bound) and the time left at the
    current pace."""
    if not self.enabled:
      return
    if self._pace_from is None:
      # The pace counts from the first logged step: the steps before it include compiling.
      self._pace_from = (step, time.perf_counter())
    done = step - self._pace_from[0]
    elapsed = time.perf_counter() - self._pace_from[1]
    left = (self.total_steps - step) * elapsed / done if done > 0 else float('nan')
    eta = time.strftime('%H:%M:%S', time.gmtime(left)) if math.isfinite(left) else '?'
    width = len(str(self.total_steps))
    print(f'step {step:>{width}}/{self.total_steps}  loss {loss:7.4f}  '
          f'{tokens_per_sec:9.0f} tokens/s  data wait {100 * data_wait:3.0f}%  ETA {eta}',
          file=sys.stderr, flush=True)

  def close(self) -> None:
    """Flushes and closes both files (each even when the other fails). A storage
    failure is raised unless one was raised already or another error is on its way out
    (close in a `finally`): the first error is the one to read."""
    if not self.enabled or self._file.closed:
      return
    quiet = self.failed is not None or sys.exc_info()[1] is not None
    failures = []
    for path, file in ((self.path, self._file), (self._tb.path, self._tb)):
      try:
        with self._storage(path):
          file.close()
      except run_dir.StorageError as e:
        failures.append(e)
    if failures and not quiet:
      raise failures[0]
