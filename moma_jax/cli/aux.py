"""moma-aux: post-hoc auxiliary routers for a finished run, then causal evaluation.

Usage:
  moma-aux --workdir RUN [--steps 300] [--lr 3e-3] [--seed 0] [--calibration_tokens 262144]
           [--force] [--json] [--config.mesh.fsdp=8 ...]

Freezes RUN's newest checkpoint, trains an auxiliary router per expert group and MoD
layer to predict the group-level top-k decisions (moma_jax/inference/aux_stage.py),
calibrates their compute-matched thresholds on training batches (each expert then takes
its training capacity of tokens; moma_jax/inference/thresholds.py), then evaluates on
the evaluation batches (the validation splits mixed and packed as training's, so routing
groups mix the datasets as training's do) and prints per modality:
  the teacher-forced loss, the causal loss at threshold 0.5 (the paper's) and at the
  compute-matched thresholds, the gaps; forward FLOPs per token of the three modes; and
  the routers' accuracy, balanced accuracy, precision and recall.
Results go to RUN/aux_router/ (params, metrics.jsonl, result.json); the run's own
checkpoints and metrics are not touched. A stage already finished on the same
checkpoint is reused (its result printed) unless --force. A run trained with
`model.aux_router.mode='joint'` has its routers already: it is only evaluated.

`--config.mesh.data/fsdp/expert/tensor=N` (the others 1; -1: the devices left over)
runs the stage sharded over the devices of every process by the training rules, for a
run larger than one device; without them on one device.
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags
import jax

from moma_jax.cli import command as cli
from moma_jax.cli import distributed
from moma_jax import configs
from moma_jax.data import checks as data_checks
from moma_jax.data import pipeline
from moma_jax.inference import aux_stage
from moma_jax.inference import aux_store
from moma_jax.inference import saved_run
from moma_jax.runs import saved
from moma_jax.inference import thresholds
from moma_jax.model import names
from moma_jax.model import sharding
from moma_jax.model import transformer
from moma_jax import run_dir
from moma_jax import run_lock
from moma_jax.training import metrics_log

PROG = 'moma-aux'
WORKDIR = cli.define_once(flags.DEFINE_string, 'workdir', None,
                          'the run directory (moma-train --workdir)')
STEPS = cli.define_once(flags.DEFINE_integer, 'steps', 300,
                        'training steps of the auxiliary routers (batches of the run size)')
LR = cli.define_once(flags.DEFINE_float, 'lr', 3e-3, 'peak learning rate (AdamW)')
SEED = cli.define_once(flags.DEFINE_integer, 'seed', 0, 'initialization of the routers')
FORCE = cli.define_once(flags.DEFINE_bool, 'force', False,
                        'train again even if a finished stage exists for this checkpoint')
CALIBRATION_TOKENS = cli.define_once(
    flags.DEFINE_integer, 'calibration_tokens', aux_stage.CALIBRATION_TOKENS,
    'training token positions the compute-matched causal thresholds are calibrated on')
JSON = cli.define_once(flags.DEFINE_bool, 'json', False,
                       'print the result as one JSON object instead of a table')


def _fmt(v, w, p):
  return f'{"-":>{w}}' if v is None else f'{v:>{w}.{p}f}'


def table(result: dict, modalities) -> str:
  """The losses (teacher-forced, causal at 0.5 and at the compute-matched thresholds)
  and their gaps on the evaluation batches (the validation splits mixed as training
  mixes them); forward FLOPs per token of each mode; router rates. Rows: overall and
  each modality."""
  rows = (('overall', ''), *((m, f'/{m}') for m in modalities))
  cols = ('eval/loss', 'eval_causal/loss', 'eval_causal_calibrated/loss', 'gap',
          'gap_calibrated')
  lines = [f'{"loss":<10}{"teacher-forced":>16}{"causal 0.5":>12}'
           f'{"causal matched":>16}{"gap 0.5":>10}{"gap matched":>13}   '
           '(validation splits mixed as in training)']
  for label, suffix in rows:
    v = [result.get(f'{c}{suffix}') for c in cols]
    lines.append(f'{label:<10}{_fmt(v[0], 16, 4)}{_fmt(v[1], 12, 4)}{_fmt(v[2], 16, 4)}'
                 f'{_fmt(v[3], 10, 4)}{_fmt(v[4], 13, 4)}')
  lines.append(f'{"MFLOPs/tok":<10}{"teacher-forced":>16}{"causal 0.5":>12}'
               f'{"causal matched":>16}   (forward; causal: as routed, aux routers in)')
  for label, suffix in rows:
    v = [result.get(f'flops/{mode}{suffix}') for mode in
         ('eval', 'eval_causal', 'eval_causal_calibrated')]
    v = [None if x is None else x / 1e6 for x in v]
    lines.append(f'{label:<10}{_fmt(v[0], 16, 3)}{_fmt(v[1], 12, 3)}{_fmt(v[2], 16, 3)}')
  lines.append(f'{"routers":<10}{"accuracy":>16}{"balanced":>12}{"precision":>16}'
               f'{"recall":>10}   (threshold 0.5, vs teacher-forced)')
  kinds = [(m, m) for m in modalities] + [
      (name, kind) for kind, name in (('all', 'experts'), ('depth', 'MoD'))]
  for label, kind in kinds:
    v = [result.get(names.aux_router_metric(r, kind))
         for r in ('accuracy', 'balanced_accuracy', 'precision', 'recall')]
    if all(x is None for x in v):
      continue        # moma's groups have per-modality rates; moe and MoD their own kind
    lines.append(f'{label:<10}{_fmt(v[0], 16, 3)}{_fmt(v[1], 12, 3)}{_fmt(v[2], 16, 3)}'
                 f'{_fmt(v[3], 10, 3)}')
  return '\n'.join(lines)


def _stage(run, model, config, tok, log) -> tuple[object, dict]:
  """(parameters with the trained and calibrated routers, the result): the stage on
  `run`'s mesh (called under it)."""
  joint = run.model.mode.aux_routers
  params = run.params
  # Batches [B, L]: each process reads its rows, placed over the mesh's batch axes.
  batch_sh = sharding.batch_sharding(run.mesh)
  put = lambda batch: sharding.global_batch(batch, batch_sh)
  if not joint:
    print(f'{PROG}: training auxiliary routers of {run.workdir} (step {run.step}) for '
          f'{STEPS.value} steps of {config.train.batch_size} x {config.data.seq_len}',
          file=sys.stderr, flush=True)

    def on_row(step, row):
      log.write(step, row)
      loss, accuracy = (row[names.aux_router_metric(s)] for s in ('loss', 'balanced_accuracy'))
      print(f'  step {step:>5}/{STEPS.value}  loss {loss:.4f}  '
            f'balanced accuracy {accuracy:.3f}',
            file=sys.stderr, flush=True)
    fresh = aux_stage.init_aux_params(model, SEED.value, run.mesh)
    aux = aux_stage.train_routers(model, aux_store.merge(run.params, fresh), config, tok,
                                  steps=STEPS.value, lr=LR.value, on_row=on_row, put=put)
    params = aux_store.merge(run.params, aux)
  print(f'{PROG}: calibrating compute-matched thresholds on '
        f'{CALIBRATION_TOKENS.value} training tokens', file=sys.stderr, flush=True)
  params = aux_stage.calibrate(
      model, params, config, tok, CALIBRATION_TOKENS.value,
      on_pass=lambda s, n: print(f'  pass {s}/{n}', file=sys.stderr, flush=True), put=put)
  print(f'{PROG}: evaluating teacher-forced and causal (thresholds 0.5 and matched)',
        file=sys.stderr, flush=True)
  result = aux_stage.evaluate_modes(model, params, config, tok, put=put)
  result.update(thresholds.summary(params))
  result.update(run_step=run.step, train_flops=run.progress.get('train_flops'),
                steps=0 if joint else STEPS.value, lr=LR.value, mode=(
                    'joint' if joint else 'post_hoc'),
                calibration_tokens=CALIBRATION_TOKENS.value)
  log.write(STEPS.value if not joint else 0, {k: v for k, v in result.items()
                                               if isinstance(v, (int, float))})
  return params, result


def main(mesh_overrides: dict[str, int]) -> None:
  distributed.initialize()
  if not WORKDIR.value:
    raise cli.UsageError('--workdir DIR is required')
  if STEPS.value < 1:
    raise cli.UsageError(f'--steps must be >= 1, got {STEPS.value}')
  if not LR.value > 0:
    raise cli.UsageError(f'--lr must be > 0, got {LR.value}')
  if CALIBRATION_TOKENS.value < 1:
    raise cli.UsageError(f'--calibration_tokens must be >= 1, got '
                         f'{CALIBRATION_TOKENS.value}')
  config = saved.read_config(os.path.abspath(os.path.expanduser(WORKDIR.value)))
  if not configs.looks_ahead(config.model):
    raise cli.UsageError(f'{WORKDIR.value}: a {config.model.ffn} model without mixture-of-'
                         'depths routes causally already; it needs no auxiliary routers')
  # One writer per run directory: not beside a trainer still writing RUN (released
  # when `run` returns: run_lock.scope()).
  run_lock.hold(os.path.expanduser(WORKDIR.value), PROG, enabled=jax.process_index() == 0)
  mesh = saved.mesh_for(WORKDIR.value, mesh_overrides)
  run = saved_run.load(WORKDIR.value, with_aux_routers=False, mesh=mesh)
  done = aux_store.read_result(run.workdir)
  mods = list(config.model.modalities)
  if done is not None and done.get('run_step') == run.step and not FORCE.value:
    print(f'{PROG}: {aux_store.directory(run.workdir)} is done for step {run.step} '
          '(--force trains again)', file=sys.stderr)
    print(json.dumps(done) if JSON.value else table(done, mods))
    return

  tok = pipeline.load_tokenizers(config)
  data_checks.check(config, tok)       # before anything is written
  joint = run.model.mode.aux_routers
  model = run.model if joint else transformer.build(config, aux_routers=True)
  try:
    os.makedirs(aux_store.directory(run.workdir), exist_ok=True)
    if not joint:
      aux_store.mark_unfinished(run.workdir)   # until the new routers are saved
  except OSError as e:
    raise cli.UsageError(f'cannot write {aux_store.directory(run.workdir)} '
                         f'({e.strerror or e})') from e
  log = metrics_log.MetricsLog(aux_store.directory(run.workdir), resume_step=0,
                               total_steps=STEPS.value, enabled=jax.process_index() == 0)
  try:
    with jax.set_mesh(run.mesh), sharding.axis_rules():
      params, result = _stage(run, model, config, tok, log)
  finally:
    log.close()
  aux_store.save(run.workdir, aux_store.split(params)[1], result)
  print(json.dumps(result) if JSON.value else table(result, mods))


def run(argv: list[str] | None = None) -> None:
  """Console script entry point (`moma-aux`); argv[0] is the program name."""
  with run_lock.scope():
    cli.run_main(main, argv, prog=PROG, usage=__doc__, with_config=False, with_mesh=True,
                 user_errors=(*pipeline.DATA_ERRORS, run_dir.RunDirError))


if __name__ == '__main__':
  run(sys.argv)
