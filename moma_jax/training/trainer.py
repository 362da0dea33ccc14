"""The trainer behind `moma-train` (moma_jax/cli/train.py): `train(config, workdir)`.

Writes into the workdir: `config.json`, `metrics.jsonl` (one JSON row per logged step and
per evaluation; keys in moma_jax/training/metrics_log.py and docs/design.md §6),
TensorBoard events under `tensorboard/`, and Orbax checkpoints under `checkpoints/`
(state, progress with the data position, config). A workdir holding checkpoints resumes
from the newest one and drops the metric rows past it, so a killed run restarted with
the same command continues bit-identically. With `upcycle.from_workdir=SRC,
upcycle.at_step=N`, a new run starts from step N of the 1t1i MoMa run SRC
(moma_jax/training/upcycle.py). SIGTERM or SIGINT saves the current step and returns. A
non-finite loss or gradient skips the update; `train.max_nonfinite` of them in a row
raise `NonFiniteError`.

How it keeps the devices busy:
  * one state on the devices: restored or created, never both, and donated to every
    step (moma_jax/training/step.py);
  * batches made and placed `train.prefetch` steps ahead by a background thread
    (moma_jax/training/prefetch.py);
  * the host reads what it needs of step s (token counts, the finite flag) after it
    has dispatched step s+1, so it never waits for a step it could overlap; it waits
    for a step only where the state after it is needed (evaluation, checkpoint, the
    last step) or a stop signal came;
  * processes agree on stopping on logged steps only (one small collective there), not
    on every step.
Each logged row says where the time went since the previous one (`time/...` keys).

The trainer reads top to bottom: set-up (everything that can fail on user input), then
the start state; the loop itself is moma_jax/training/loop.py, a short sequence of
periodic actions over the progress record (moma_jax/training/progress.py).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

import jax
import ml_collections

from moma_jax.analysis import flops
from moma_jax import configs
from moma_jax.data import checks as data_checks
from moma_jax.data import pipeline
from moma_jax.model import sharding
from moma_jax.model import transformer
from moma_jax import run_dir
from moma_jax import run_lock
from moma_jax.runs import checkpoint as ckpt_lib
from moma_jax.training import checks as train_checks
from moma_jax.training import loop as loop_lib
from moma_jax.training import optimizer as optimizer_lib
from moma_jax.training import progress as progress_lib
from moma_jax.runs import state as train_state
from moma_jax.training import upcycle

PROG, PROFILE_DIR = loop_lib.PROG, loop_lib.PROFILE_DIR
USER_ERRORS = (*pipeline.DATA_ERRORS, run_dir.RunDirError, ckpt_lib.CheckpointError)
NonFiniteError = progress_lib.NonFiniteError


def _my_rows(position: dict[str, Any], batch_size: int) -> dict[str, Any]:
  """This process's rows of a whole-batch position (the inverse of `_all_rows_state`)."""
  mine = pipeline.process_rows(batch_size, jax.process_index(), jax.process_count())
  return {'rows': [position['rows'][r] for r in mine]}



# ==================================================================================
# Set-up: everything that can fail on user input, before anything is written
# ==================================================================================
def _set_up(config, workdir: str, label: str) -> loop_lib.Job:
  configs.validate(config)
  mesh = sharding.make_mesh(config)
  workdir = train_checks.check_workdir(workdir, config)
  tok = pipeline.load_tokenizers(config)
  data_checks.check(config, tok)   # bad data fails now, before the workdir is made
  # A new upcycled run: a missing or unfit source fails now too.
  if config.upcycle.from_workdir and not ckpt_lib.has_checkpoints(workdir):
    upcycle.check_source(config)
  model = transformer.build(config)
  tx = optimizer_lib.optimizer(config)
  abstract, state_sh = train_state.layout(model, tx, mesh)
  return loop_lib.Job(config, workdir, label, mesh, tok,
              pipeline.train_iterator(config, tok, jax.process_index(), jax.process_count()),
              model, flops.count(config), tx, train_checks.to_plain(config), abstract,
              state_sh, train_state.formats(abstract), sharding.batch_sharding(mesh))


def _summary(run: loop_lib.Job, resume_step: int) -> str:
  config, report = run.config, run.report
  m, t = config.model, config.train
  mods = (*m.modalities, 'overall')
  per = lambda d, scale, fmt: ', '.join(f'{k} {d[k] / scale:{fmt}}' for k in mods)
  mod = f' ({report.num_mod_layers} MoD)' if report.num_mod_layers else ''
  devices = jax.devices()
  tokens = t.batch_size * config.data.seq_len
  start = f'resuming from step {resume_step}' if resume_step else 'new run'
  u = config.upcycle
  optimizer = ('its optimizer and LR schedule carried on from update '
               f'{configs.carried_updates(config)}' if u.optimizer == 'carry'
               else 'fresh optimizer and LR schedule')
  upcycled = ([f'  upcycled    from {os.path.abspath(u.from_workdir)} at step {u.at_step}: '
               f'its FFNs in every expert, fresh routers, {optimizer}; its data position, '
               'FLOPs and tokens continue'] if u.from_workdir else [])
  return '\n'.join([
      f'{PROG}: {run.label} -> {run.workdir} ({start})', *upcycled,
      f'  model       {configs.ffn_label(m)}, {m.num_layers} layers{mod}, d_model '
      f'{m.d_model}, {m.num_heads} heads, ffn {m.ffn_dim}, vocab {m.vocab_size}, {m.dtype}',
      f'  params      total {report.params_total / 1e6:.4g}M; active per token '
      f'{per(report.params_active, 1e6, ".4g")} (M)',
      f'  train FLOPs per token {per(report.train, 1e6, ".4g")} (MFLOPs)',
      f'  devices     {len(devices)} x {devices[0].platform} ({devices[0].device_kind}), '
      f'{jax.process_count()} process(es); mesh {sharding.describe(run.mesh)}',
      f'  batch       {t.batch_size} x {config.data.seq_len} = {tokens} tokens per step '
      f'(grad_accum {t.grad_accum}, {t.prefetch} prefetched); {t.steps} steps = '
      f'{t.steps * tokens:,} tokens (padding included)',
      f'  schedule    lr {t.lr} {t.schedule}, warmup {t.warmup}, decay to 1%; '
      f'eval every {t.eval_every}, checkpoint every {t.ckpt_every} (keep {t.keep})'])


def train(config: ml_collections.ConfigDict, workdir: str, *, label: str = '',
          profile_steps: int = 0,
          on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns its final progress dict
  (`Progress` fields).

  profile_steps: trace this many steps, from the second one this process runs (the
  first compiles), into `workdir/profile` with the JAX profiler.
  on_step: called with the step number after each step's logging, evaluation and
  checkpoint (tests use it to stop or crash a run at a chosen step).
  Raises ConfigError / UsageError / data errors before writing anything, and
  WorkdirBusyError when another run holds the workdir (moma_jax/run_lock.py);
  StorageError when a write fails for lack of space or permission (the last good
  checkpoint stays, a rerun resumes); NonFiniteError after `train.max_nonfinite`
  non-finite steps in a row.
  """
  run = _set_up(config, workdir, label)
  is_writer = jax.process_index() == 0
  with _hold(run.workdir, is_writer), contextlib.ExitStack() as closing:
    ckpts = ckpt_lib.Checkpoints(run.workdir, keep=config.train.keep, primary=is_writer)
    # Let the started saves finish on the way out: the files they write must be whole.
    closing.callback(ckpts.close)
    state, progress, position = _start(run, ckpts)
    config_json = os.path.join(run.workdir, run_dir.CONFIG_FILE)
    with run_dir.storage_errors(config_json, detail=ckpts.last_good):
      run_dir.write_json(config_json, run.plain_config)
    if is_writer:
      print(_summary(run, progress.step), flush=True)
    # Everything below traces the model: under the mesh and its logical-axis rules.
    with jax.set_mesh(run.mesh), sharding.axis_rules():
      loop = loop_lib.Loop(run, ckpts, progress, position, profile_steps, on_step, is_writer)
      # The loop owns the one state from here on: `train` keeps no reference to it.
      return loop.run(_handed_over(state))


@contextlib.contextmanager
def _hold(workdir: str, is_writer: bool) -> Iterator[None]:
  """The workdir's lock (moma_jax/run_lock.py), held by process 0 for the whole run.

  Every process learns whether process 0 got it (one collective), so that a refused
  run ends everywhere with one line instead of waiting in the first collective.
  """
  lock = refused = None
  try:
    lock = run_lock.hold(workdir, PROG, enabled=is_writer)
  except run_lock.WorkdirBusyError as e:
    refused = e
  if loop_lib.any_process(refused is not None):
    raise refused or run_lock.WorkdirBusyError(workdir, None)
  with lock:
    yield


def _handed_over(state: Any) -> Iterator[Any]:
  """The state as a one-shot iterator, so that the caller's frame drops its reference
  when the loop takes it (a donated state must have one owner)."""
  yield state


# ==================================================================================
# The start state: the workdir's newest checkpoint, else the upcycled start, else init
# ==================================================================================
def _start(run: loop_lib.Job, ckpts: ckpt_lib.Checkpoints):
  """(state, Progress, this process's data position or None) to train from.

  Restored into the abstract state (each leaf placed by its sharding) and built only
  when there is nothing to restore: one state on the devices, never two. Either way in
  the training step's formats (`train_state.formats`: the expert arrays row-major).
  """
  def another_run(saved: dict[str, Any]) -> str | None:
    key = train_checks.resume_mismatch(saved, run.plain_config)
    return None if key is None else f'written by a run with another {key}'
  restored = ckpts.restore_latest(run.abstract, accept=another_run)
  if restored is not None:
    _, state, saved = restored
    state = train_state.place(state, run.state_formats)
  elif run.config.upcycle.from_workdir:
    state, saved = upcycle.initial_state(run.config, run.tx, run.model, run.state_formats,
                                         run.mesh)
  else:
    state = train_state.create(run.model, run.tx, run.state_formats, run.config.train.seed)
    return state, progress_lib.Progress(), None
  position = _my_rows(saved['data'], run.config.train.batch_size)
  return state, progress_lib.Progress.from_saved(saved), position

