"""The training loop: launch step s+1, then do the host's work for step s.

`Loop(job, ckpts, progress, position, ...).run(state)` trains from `progress.step` to
`train.steps` (or a stop signal) as a short sequence of periodic actions over the
progress record (moma_jax/training/progress.py): count the step, write its metrics row,
evaluate, save, call `on_step`, agree on stopping. The set-up that makes its inputs is
moma_jax/training/trainer.py; why the loop is shaped this way is said there.

The host reads what it needs of step s (`progress.counted_keys`: token counts, the
finite flag) only after it has dispatched step s+1, so its work for step s overlaps the
devices' step s+1. Where the state after a step is needed (evaluation, checkpoint, the
last step) or a stop signal came, it finishes that step before launching another: the
state is donated to every step, so nothing may read it once the next one runs.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Iterator

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from moma_jax.analysis import flops
from moma_jax.data import pipeline
from moma_jax.model import names
from moma_jax.model import sharding
from moma_jax.model import transformer
from moma_jax.runs import evaluation
from moma_jax.training import metrics_log
from moma_jax.training import optimizer as optimizer_lib
from moma_jax.training import prefetch
from moma_jax.training import progress as progress_lib
from moma_jax.training.step import make_train_step

PROG = 'moma-train'
PROFILE_DIR = 'profile'


# ==================================================================================
# Several processes: what they must agree on
# ==================================================================================
def any_process(flag: bool) -> bool:
  """True on every process if it is True on any (one collective when there are several)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def _all_rows_state(position: dict[str, Any]) -> dict[str, Any]:
  """The position of every row of the global batch, from this process's `position`
  ({'rows': [...]}, its rows' streams) gathered from all processes.

  Process p owns rows [p*B/P, (p+1)*B/P), so their lists in process order are the rows
  in order; a checkpoint then resumes under any number of processes.
  """
  rows = position['rows']
  if jax.process_count() == 1:
    return {'rows': rows}
  encoded = np.frombuffer(json.dumps(rows).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(encoded.size)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:encoded.size] = encoded
  every = np.asarray(multihost_utils.process_allgather(padded))           # [P, max bytes]
  return {'rows': [row for p, size in enumerate(sizes)
                   for row in json.loads(every[p, :size].tobytes())]}



@dataclasses.dataclass
class Job:
  """What the set-up made: the loop's inputs (no device state)."""
  config: ml_collections.ConfigDict
  workdir: str
  label: str
  mesh: jax.sharding.Mesh
  tok: Any
  data: pipeline.TrainIterator
  model: transformer.Decoder
  report: flops.FlopsReport
  tx: Any
  plain_config: dict[str, Any]
  abstract: Any                 # the state as sharded ShapeDtypeStructs
  state_sh: Any
  state_formats: Any            # the step's: state_sh, expert arrays row-major (runs/state.py)
  batch_sh: jax.sharding.NamedSharding



# ==================================================================================
# The loop
# ==================================================================================
class _StopRequest:
  """Turns SIGTERM / SIGINT into a flag the loop reads after every step (several
  processes: on logged steps, where they agree)."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    # Handlers can only be installed from the main thread (not e.g. in a notebook worker).
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _Clock:
  """Where the host's time went since the last logged row: `time/...` keys."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.start, self.spent = time.perf_counter(), collections.defaultdict(float)

  @contextlib.contextmanager
  def timing(self, what: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.spent[what] += time.perf_counter() - start

  def row(self, steps: int, tokens: int) -> dict[str, float]:
    """tokens_per_sec and the time/ keys of `steps` steps and `tokens` tokens; resets.

    Training time is the interval's wall time less evaluation and checkpointing:
      time/step        training wall time per step (the device's step, or the host's
                       batch where that is slower: they overlap)
      time/data_wait   of it, seconds the loop waited for the next batch
      time/eval, time/checkpoint   seconds blocked in evaluation and in saving
    """
    wall = time.perf_counter() - self.start
    training = max(wall - self.spent['eval'] - self.spent['checkpoint'], 1e-9)
    row = {'tokens_per_sec': tokens / training, 'time/step': training / max(steps, 1),
           'time/data_wait': self.spent['data_wait'], 'time/eval': self.spent['eval'],
           'time/checkpoint': self.spent['checkpoint']}
    self.reset()
    return row


@dataclasses.dataclass
class _Launched:
  """A step whose results the host has not read yet."""
  step: int
  metrics: dict[str, jax.Array]
  position: Any                 # the data position after its batch


class Loop:
  """The training loop: launch step s+1, then do the host's work for step s."""

  def __init__(self, job: Job, ckpts, progress: progress_lib.Progress, position,
               profile_steps: int, on_step, is_writer: bool):
    config = job.config
    self.job, self.ckpts, self.progress, self.on_step = job, ckpts, progress, on_step
    self.t, self.mods = config.train, tuple(config.model.modalities)
    self.is_writer = is_writer
    if position is not None:
      job.data.set_state(position)
    self.position = position            # of the last batch a step consumed
    self.log = metrics_log.MetricsLog(job.workdir, resume_step=progress.step,
                                      total_steps=self.t.steps, enabled=is_writer,
                                      last_good=ckpts.last_good)
    self.train_step = make_train_step(job.model, job.tx, config,
                                      (job.state_formats, job.batch_sh))
    params_sh = (job.state_sh['params'], job.batch_sh)
    datasets = evaluation.datasets_of(config)
    self.eval_steps = {'eval': evaluation.make_eval_step(job.model, self.mods, datasets,
                                                         shardings=params_sh)}
    if job.model.mode.aux_routers:         # jointly trained routers: the causal model too
      self.eval_steps['eval_causal'] = evaluation.make_eval_step(
          job.model.in_mode(causal=True), self.mods, datasets, shardings=params_sh)
    # The logged rate: the schedule at the optimizer's own count, evaluated on the host
    # (the update's in-step value may differ from it in the last float32 bit).
    self.schedule = optimizer_lib.learning_rate(config)
    self.flops_per_token = {m: job.report.train[m] for m in self.mods}
    # 1-based steps [first, last] to trace; none if profile_steps is 0.
    self.trace = (progress.step + 2, progress.step + 1 + profile_steps) if profile_steps \
        else None
    self.clock, self.interval_tokens, self.last_row = _Clock(), 0, progress.step
    self.state = None

  def put(self, batch):
    return sharding.global_batch(batch, self.job.batch_sh)

  def needs_state(self, step: int) -> bool:
    """Whether the host needs the state after `step` (it must not launch the next one)."""
    return (step % self.t.eval_every == 0 or step % self.t.ckpt_every == 0
            or step == self.t.steps)

  def run(self, handed_state: Iterator[Any]) -> dict[str, Any]:
    self.state = next(handed_state)
    try:
      with prefetch.Prefetcher(self.job.data, self.put, self.t.prefetch) as batches, \
          _StopRequest() as stop:
        self.stop = stop
        stopping = self.train(batches)
        self.finish(stopping)
    finally:
      self.log.close()
      self.state = None
    return self.progress.as_dict()

  def train(self, batches) -> bool:
    """Steps until the last one or a stop signal; True if stopped by a signal."""
    step, pending, stopping = self.progress.step, None, False
    while step < self.t.steps and not stopping:
      with self.clock.timing('data_wait'):
        batch, position = next(batches)
      step += 1
      previous, pending = pending, _Launched(step, self.launch(step, batch), position)
      if previous is not None:        # read while step `step` computes
        stopping = self.after_step(previous)
      if pending is not None and (self.needs_state(step) or stopping):
        stopping = self.after_step(pending) or stopping
        pending = None
    return stopping

  def launch(self, step: int, batch) -> dict[str, jax.Array]:
    """Dispatches step `step` (it runs asynchronously); returns its metrics' arrays."""
    if self.trace and step == self.trace[0]:
      jax.profiler.start_trace(os.path.join(self.job.workdir, PROFILE_DIR))
    self.state, metrics = self.train_step(self.state, batch, jnp.int32(step))
    if self.trace and step == self.trace[1]:
      jax.block_until_ready(self.state)
      jax.profiler.stop_trace()
    return metrics

  def after_step(self, done: _Launched) -> bool:
    """The host's work for a finished step, in order; True if the run must stop."""
    counted = jax.device_get({k: done.metrics[k]
                              for k in progress_lib.counted_keys(self.mods)})
    self.progress.count(done.step, counted, self.flops_per_token, self.t.max_nonfinite)
    self.position = done.position
    self.interval_tokens += int(counted['tokens'])
    step = done.step
    logged = step == 1 or step % self.t.log_every == 0 or step == self.t.steps
    if logged:
      self.write_row(done)
    if step % self.t.eval_every == 0 or step == self.t.steps:
      self.evaluate()
    self.save(force=step == self.t.steps)
    if self.on_step is not None:
      self.on_step(step)
    # Every process stops at the same step: they agree on logged steps (one process
    # needs no agreement, and stops at once).
    if jax.process_count() == 1 or logged:
      return any_process(self.stop.signal is not None)
    return False

  def write_row(self, done: _Launched) -> None:
    host = jax.device_get({k: v for k, v in done.metrics.items() if k != 'finite'})
    # A modality without targets in this batch has no loss (not a loss of 0).
    absent = {names.per_modality(names.LOSS_METRIC, m) for m in self.mods
              if not host[names.per_modality(names.TOKENS, m)]}
    steps, self.last_row = done.step - self.last_row, done.step
    timing = self.clock.row(steps, self.interval_tokens)
    self.interval_tokens = 0
    p = self.progress
    row = {'train_flops': p.train_flops, names.TOKENS: p.tokens,
           **{names.per_modality(names.BATCH_TOKENS, m):
              host[names.per_modality(names.TOKENS, m)] for m in self.mods},
           **{k: v for k, v in host.items() if k == names.LOSS_METRIC or (
               k.startswith(names.ROW_PREFIXES) and k not in absent)},
           'tokens_per_sec': timing.pop('tokens_per_sec'),
           'lr': float(self.schedule(int(host['update_count']))),
           **{k: host[k] for k in (names.GRAD_NORM, names.Z_LOSS, names.BALANCE_LOSS)},
           'nonfinite_skipped': p.nonfinite_skipped, **timing}
    row = self.log.write(done.step, row)
    waiting = row['time/data_wait'] / max(row['time/step'] * steps, 1e-9)
    self.log.progress(done.step, row['loss'], row['tokens_per_sec'], waiting)

  def evaluate(self) -> None:
    with self.clock.timing('eval'):
      row = {'train_flops': self.progress.train_flops}
      for prefix, eval_step in self.eval_steps.items():
        row.update(evaluation.evaluate(eval_step, self.state['params'], self.job.config,
                                       self.job.tok, self.put, prefix=prefix))
      self.log.write(self.progress.step, row)

  def save(self, force: bool = False) -> bool:
    # Decided here, not by Orbax: gathering the data position is collective.
    step = self.progress.step
    if not (force or step % self.t.ckpt_every == 0):
      return False
    with self.clock.timing('checkpoint'):
      saved = {**self.progress.as_dict(), 'data': _all_rows_state(self.position)}
      return self.ckpts.save(step, self.state, saved, self.job.plain_config)

  def finish(self, stopping: bool) -> None:
    """End of training or a signal: the last step saved, one message."""
    step, workdir = self.progress.step, self.job.workdir
    if stopping and self.ckpts.latest_step() != step:
      self.save(force=True)
    with self.clock.timing('checkpoint'):
      self.ckpts.wait()             # on disk before the message says so
    if not self.is_writer:
      return
    if stopping:
      print(f'{PROG}: {self.stop.signal or "stop signal"} at step {step}: checkpoint saved '
            f'in {self.ckpts.directory}; rerun the same command to continue',
            file=sys.stderr, flush=True)
      return
    where = lambda name: os.path.join(workdir, name)
    print(f'{PROG}: finished {step} steps ({self.progress.train_flops:.4g} training FLOPs)'
          f'\n  metrics      {where(metrics_log.METRICS_FILE)}'
          f'\n  TensorBoard  tensorboard --logdir {where(metrics_log.TENSORBOARD_DIR)}'
          f'\n  checkpoints  {self.ckpts.directory}', flush=True)
