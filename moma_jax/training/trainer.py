"""The trainer behind `moma-train` (moma_jax/cli/train.py): `train(config, workdir)`.

Writes into the workdir: `config.json`, `metrics.jsonl` (one JSON row per logged step and
per evaluation; keys in moma_jax/training/metrics_log.py and docs/design.md §6),
TensorBoard events under `tensorboard/`, and Orbax checkpoints under `checkpoints/`
(state, data position, config). A workdir holding checkpoints resumes from the newest
one and drops the metric rows past it, so a killed run restarted with the same command
continues bit-identically. With `upcycle.from_workdir=SRC, upcycle.at_step=N`, a new
run starts from step N of the 1t1i MoMa run SRC (moma_jax/training/upcycle.py).
SIGTERM or SIGINT saves the current step and returns. A non-finite loss or gradient
skips the update; `train.max_nonfinite` of them in a row raise `NonFiniteError`.

The trainer reads top to bottom: what several processes share, then the loop. The jit'd
step is in moma_jax/training/step.py, the checks of config and workdir in
moma_jax/training/checks.py, the optimizer in moma_jax/training/optimizer.py, evaluation in
moma_jax/training/evaluation.py.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from moma_jax.analysis import flops
from moma_jax import configs
from moma_jax.data import checks as data_checks
from moma_jax.data import pipeline
from moma_jax.model import sharding
from moma_jax.model import transformer
from moma_jax import run_dir
from moma_jax.training import checkpoint as ckpt_lib
from moma_jax.training import checks as train_checks
from moma_jax.training import evaluation
from moma_jax.training import metrics_log
from moma_jax.training import optimizer as optimizer_lib
from moma_jax.training import state as train_state
from moma_jax.training.step import make_train_step
from moma_jax.training import upcycle
from moma_jax import usage

PROG = 'moma-train'
USER_ERRORS = (*pipeline.DATA_ERRORS, run_dir.RunDirError, ckpt_lib.CheckpointError)
PROFILE_DIR = 'profile'


class NonFiniteError(RuntimeError):
  """Too many non-finite losses or gradients in a row: exit code 1."""


# ==================================================================================
# Several processes: what they must agree on
# ==================================================================================
def _any_process(flag: bool) -> bool:
  """True on every process if it is True on any (one collective when there are several)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def _all_rows_state(data: pipeline.TrainIterator) -> dict[str, Any]:
  """The position of every row of the global batch, gathered from all processes.

  Process p owns rows [p*B/P, (p+1)*B/P), so their lists in process order are the rows
  in order; a checkpoint then resumes under any number of processes.
  """
  rows = data.get_state()['rows']
  if jax.process_count() == 1:
    return {'rows': rows}
  encoded = np.frombuffer(json.dumps(rows).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(encoded.size)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:encoded.size] = encoded
  every = np.asarray(multihost_utils.process_allgather(padded))           # [P, max bytes]
  return {'rows': [row for p, size in enumerate(sizes)
                   for row in json.loads(every[p, :size].tobytes())]}


# ==================================================================================
# The loop
# ==================================================================================
class _StopRequest:
  """Turns SIGTERM / SIGINT into a flag the loop checks after every step."""

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


def _summary(config, label: str, workdir: str, report: flops.FlopsReport,
             resume_step: int, mesh: jax.sharding.Mesh) -> str:
  m, t = config.model, config.train
  mods = (*m.modalities, 'overall')
  per = lambda d, scale, fmt: ', '.join(f'{k} {d[k] / scale:{fmt}}' for k in mods)
  ffn = configs.ffn_label(m)
  mod = f' ({report.num_mod_layers} MoD)' if report.num_mod_layers else ''
  devices = jax.devices()
  tokens = t.batch_size * config.data.seq_len
  start = f'resuming from step {resume_step}' if resume_step else 'new run'
  u = config.upcycle
  upcycled = ([f'  upcycled    from {os.path.abspath(u.from_workdir)} at step {u.at_step}: '
               'its FFNs in every expert, fresh routers, optimizer and LR schedule; its '
               'data position, FLOPs and tokens continue'] if u.from_workdir else [])
  return '\n'.join([
      f'{PROG}: {label} -> {workdir} ({start})', *upcycled,
      f'  model       {ffn}, {m.num_layers} layers{mod}, d_model {m.d_model}, '
      f'{m.num_heads} heads, ffn {m.ffn_dim}, vocab {m.vocab_size}, {m.dtype}',
      f'  params      total {report.params_total / 1e6:.4g}M; active per token '
      f'{per(report.params_active, 1e6, ".4g")} (M)',
      f'  train FLOPs per token {per(report.train, 1e6, ".4g")} (MFLOPs)',
      f'  devices     {len(devices)} x {devices[0].platform} ({devices[0].device_kind}), '
      f'{jax.process_count()} process(es); mesh {sharding.describe(mesh)}',
      f'  batch       {t.batch_size} x {config.data.seq_len} = {tokens} tokens per step '
      f'(grad_accum {t.grad_accum}); {t.steps} steps = {t.steps * tokens:,} tokens '
      '(padding included)',
      f'  schedule    lr {t.lr} {t.schedule}, warmup {t.warmup}, decay to 1%; '
      f'eval every {t.eval_every}, checkpoint every {t.ckpt_every} (keep {t.keep})'])


def train(config: ml_collections.ConfigDict, workdir: str, *, label: str = '',
          profile_steps: int = 0,
          on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns its final progress dict.

  profile_steps: trace this many steps, from the second one this process runs (the
  first compiles), into `workdir/profile` with the JAX profiler.
  on_step: called with the step number after each step's logging, evaluation and
  checkpoint (tests use it to stop or crash a run at a chosen step).
  Raises ConfigError / UsageError / data errors before writing anything; NonFiniteError
  after `train.max_nonfinite` non-finite steps in a row.
  """
  # ---------------- Set-up: everything that can fail on user input ----------------
  configs.validate(config)
  train_checks.check_train_config(config)
  mesh = sharding.make_mesh(config)
  workdir = train_checks.check_workdir(workdir, config)
  tok = pipeline.load_tokenizers(config)
  data_checks.check(config, tok)   # bad data fails now, before the workdir is made
  data = pipeline.train_iterator(config, tok, jax.process_index(), jax.process_count())
  model = transformer.build(config)
  report = flops.count(config)
  tx = optimizer_lib.optimizer(config)
  plain_config = train_checks.to_plain(config)
  abstract, state_sh = train_state.layout(model, tx, mesh)
  state = train_state.create(model, tx, state_sh, config.train.seed)
  # A new upcycled run starts from the source run (read now: a bad source must fail
  # before anything is written); once it has checkpoints of its own it resumes from them.
  upcycled = None
  if config.upcycle.from_workdir and not ckpt_lib.has_checkpoints(workdir):
    upcycled = upcycle.initial_state(config, tx, state['params'], state_sh)
  # Everything below traces the model: under the mesh and its logical-axis rules.
  with jax.set_mesh(mesh), sharding.axis_rules():
    return _train_on_mesh(config, workdir, label, profile_steps, on_step, mesh=mesh,
                          data=data, tok=tok, model=model, report=report, tx=tx,
                          plain_config=plain_config, state=(abstract, state_sh, state),
                          upcycled=upcycled)


def _train_on_mesh(config, workdir, label, profile_steps, on_step, *, mesh, data, tok,
                   model, report, tx, plain_config, state, upcycled) -> dict[str, Any]:
  """The rest of `train`, from the initial state on: under the mesh.

  upcycled: None, or (state, progress with the data position) to start from when the
  workdir has no checkpoint (`upcycle.initial_state`).
  """
  t, mods = config.train, tuple(config.model.modalities)
  abstract, state_sh, state = state
  batch_sh = sharding.batch_sharding(mesh)

  # ---------------- Workdir, checkpoints and resume ----------------
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise usage.UsageError(f'--workdir: cannot create {workdir} ({e.strerror or e})') from e
  is_writer = jax.process_index() == 0
  ckpts = ckpt_lib.Checkpoints(workdir, keep=t.keep, primary=is_writer)
  progress = dict(step=0, train_flops=0.0, tokens=0, nonfinite_skipped=0,
                  nonfinite_in_a_row=0)

  def another_run(saved: dict[str, Any]) -> str | None:
    key = train_checks.resume_mismatch(saved, plain_config)
    return None if key is None else f'written by a run with another {key}'
  try:
    restored = ckpts.restore_latest(abstract, accept=another_run)
  except ckpt_lib.CheckpointError:
    ckpts.close()
    raise
  # The workdir's own newest checkpoint; else the upcycled start; else the fresh init.
  start = restored[1:] if restored is not None else upcycled
  if start is not None:
    state, saved = start
    all_rows = saved.pop('data')['rows']
    mine = pipeline.process_rows(t.batch_size, jax.process_index(), jax.process_count())
    data.set_state({'rows': [all_rows[r] for r in mine]})
    progress.update(saved)
  step = progress['step']
  run_dir.write_json(os.path.join(workdir, run_dir.CONFIG_FILE), plain_config)
  log = metrics_log.MetricsLog(workdir, resume_step=step, total_steps=t.steps,
                               enabled=is_writer)
  if is_writer:
    print(_summary(config, label, workdir, report, step, mesh), flush=True)
  train_step = make_train_step(model, tx, config, (state_sh, batch_sh))
  eval_step = evaluation.make_eval_step(model, mods, (state_sh['params'], batch_sh))
  # Jointly trained auxiliary routers: evaluate the causal model too.
  causal_eval_step = (evaluation.make_eval_step(model.clone(causal=True), mods,
                                                (state_sh['params'], batch_sh))
                      if model.aux_routers else None)
  put = lambda batch: sharding.global_batch(batch, batch_sh)
  schedule = optimizer_lib.learning_rate(config)
  nan_steps = set(t.nan_steps or ())
  # 1-based steps [first, last] to trace; none if profile_steps is 0.
  trace_first, trace_last = step + 2, step + 1 + profile_steps

  def save(force: bool = False) -> bool:
    # Decided here, not by Orbax: gathering the data position is collective.
    if not (force or step % t.ckpt_every == 0):
      return False
    return ckpts.save(step, state, {**progress, 'data': _all_rows_state(data)}, plain_config)

  # ---------------- Training ----------------
  interval_tokens, interval_start = 0, time.perf_counter()
  try:
    with _StopRequest() as stop:
      stopping = False
      while step < t.steps and not stopping:
        batch = next(data)
        if step + 1 == trace_first and profile_steps:
          jax.profiler.start_trace(os.path.join(workdir, PROFILE_DIR))
        poison = jnp.float32(np.nan if step + 1 in nan_steps else 1.0)
        state, metrics = train_step(state, put(batch), jnp.int32(step + 1), poison)
        step += 1
        if step == trace_last and profile_steps:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
        # One small host transfer per step: token counts feed the FLOPs count, and the
        # non-finite check must see every step.
        small = jax.device_get({k: metrics[k] for k in ('finite', 'tokens',
                                                        *(f'tokens/{m}' for m in mods))})
        progress['step'] = step
        progress['tokens'] += int(small['tokens'])
        interval_tokens += int(small['tokens'])
        progress['train_flops'] += sum(report.train[m] * int(small[f'tokens/{m}'])
                                       for m in mods)
        if bool(small['finite']):
          progress['nonfinite_in_a_row'] = 0
        else:
          progress['nonfinite_skipped'] += 1
          progress['nonfinite_in_a_row'] += 1
          if progress['nonfinite_in_a_row'] >= t.max_nonfinite:
            raise NonFiniteError(
                f'{progress["nonfinite_in_a_row"]} non-finite losses or gradients in a row, '
                f'the last at step {step} ({progress["nonfinite_skipped"]} skipped in all); '
                'lower train.lr or check the data')

        if step == 1 or step % t.log_every == 0 or step == t.steps:
          host = jax.device_get({k: v for k, v in metrics.items() if k != 'finite'})
          elapsed = time.perf_counter() - interval_start
          # A modality without targets in this batch has no loss (not a loss of 0).
          absent = {f'loss/{m}' for m in mods if not host[f'tokens/{m}']}
          row = {'train_flops': progress['train_flops'], 'tokens': progress['tokens'],
                 **{f'batch_tokens/{m}': host[f'tokens/{m}'] for m in mods},
                 **{k: v for k, v in host.items() if k == 'loss' or (k.startswith(
                     ('loss/', 'route/', 'aux_router/')) and k not in absent)},
                 'tokens_per_sec': interval_tokens / max(elapsed, 1e-9),
                 'lr': float(schedule(step - 1 - progress['nonfinite_skipped'])),
                 'grad_norm': host['grad_norm'], 'z_loss': host['z_loss'],
                 'aux_loss': host['aux_loss'],
                 'nonfinite_skipped': progress['nonfinite_skipped']}
          row = log.write(step, row)
          log.progress(step, row['loss'], row['tokens_per_sec'])
          interval_tokens, interval_start = 0, time.perf_counter()

        if step % t.eval_every == 0 or step == t.steps:
          row = evaluation.evaluate(eval_step, state['params'], config, tok, put)
          if causal_eval_step is not None:
            row.update(evaluation.evaluate(causal_eval_step, state['params'], config, tok,
                                           put, prefix='eval_causal'))
          log.write(step, {'train_flops': progress['train_flops'], **row})
          interval_start = time.perf_counter()   # evaluation is not training time

        save(force=step == t.steps)
        if on_step is not None:
          on_step(step)
        # Every process stops at the same step, whichever received the signal.
        stopping = _any_process(stop.signal is not None)

      # ---------------- Stop: end of training or a signal ----------------
      if stopping and ckpts.latest_step() != step:
        save(force=True)
      if stopping and is_writer:
        print(f'{PROG}: {stop.signal or "stop signal"} at step {step}: checkpoint saved in '
              f'{ckpts.directory}; rerun the same command to continue', file=sys.stderr,
              flush=True)
      elif is_writer:
        where = lambda name: os.path.join(workdir, name)
        print(f'{PROG}: finished {step} steps ({progress["train_flops"]:.4g} training FLOPs)'
              f'\n  metrics      {where(metrics_log.METRICS_FILE)}'
              f'\n  TensorBoard  tensorboard --logdir {where(metrics_log.TENSORBOARD_DIR)}'
              f'\n  checkpoints  {ckpts.directory}', flush=True)
  finally:
    # Let the started saves finish: the file they write must be whole.
    ckpts.close()
    log.close()
  return progress
