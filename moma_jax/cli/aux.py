"""moma-aux: post-hoc auxiliary routers for a finished run, then causal evaluation.

Usage:
  moma-aux --workdir RUN [--steps 300] [--lr 3e-3] [--seed 0] [--force] [--json]

Freezes RUN's newest checkpoint, trains an auxiliary router per expert group and MoD
layer to predict the group-level top-k decisions (moma_jax/inference/aux_stage.py), then
evaluates on the validation splits, teacher-forced and causal, and prints per modality:
  loss (teacher-forced), loss (causal), their gap, and the routers' accuracy, balanced
  accuracy, precision and recall.
Results go to RUN/aux_router/ (params, metrics.jsonl, result.json); the run's own
checkpoints and metrics are not touched. A stage already finished on the same
checkpoint is reused (its result printed) unless --force. A run trained with
`model.aux_router.mode='joint'` has its routers already: it is only evaluated.
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags

from moma_jax.cli import command as cli
from moma_jax import configs
from moma_jax.data import checks as data_checks
from moma_jax.data import pipeline
from moma_jax.inference import aux_stage
from moma_jax.inference import aux_store
from moma_jax.inference import saved_run
from moma_jax.model import transformer
from moma_jax import run_dir
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
JSON = cli.define_once(flags.DEFINE_bool, 'json', False,
                       'print the result as one JSON object instead of a table')


def table(result: dict, modalities) -> str:
  """Rows: overall and each modality; columns: the losses, the gap and router rates."""
  cols = ('eval/loss', 'eval_causal/loss', 'gap')
  head = (f'{"":<10}{"teacher-forced":>16}{"causal":>10}{"gap":>9}'
          f'{"accuracy":>10}{"balanced":>10}{"precision":>11}{"recall":>8}')
  lines = [head]
  for label, suffix in (('overall', ''), *((m, f'/{m}') for m in modalities)):
    loss = [result.get(f'{c}{suffix}') for c in cols]
    # Router rates per modality exist for moma's groups (moe and MoD: rows below).
    rates = [result.get(f'aux_router/{r}{suffix}')
             for r in ('accuracy', 'balanced_accuracy', 'precision', 'recall')]
    fmt = lambda v, w, p: f'{"-":>{w}}' if v is None else f'{v:>{w}.{p}f}'
    lines.append(f'{label:<10}{fmt(loss[0], 16, 4)}{fmt(loss[1], 10, 4)}'
                 f'{fmt(loss[2], 9, 4)}{fmt(rates[0], 10, 3)}{fmt(rates[1], 10, 3)}'
                 f'{fmt(rates[2], 11, 3)}{fmt(rates[3], 8, 3)}')
  for kind in ('all', 'depth'):
    if f'aux_router/accuracy/{kind}' in result:
      name = {'all': 'experts', 'depth': 'MoD'}[kind]
      vals = [result[f'aux_router/{r}/{kind}'] for r in
              ('accuracy', 'balanced_accuracy', 'precision', 'recall')]
      lines.append(f'{name + " routers":<35}' + ''.join(
          f'{v:>{w}.3f}' for v, w in zip(vals, (10, 10, 11, 8))))
  return '\n'.join(lines)


def main() -> None:
  if not WORKDIR.value:
    raise cli.UsageError('--workdir DIR is required')
  if STEPS.value < 1:
    raise cli.UsageError(f'--steps must be >= 1, got {STEPS.value}')
  if not LR.value > 0:
    raise cli.UsageError(f'--lr must be > 0, got {LR.value}')
  config = saved_run.read_config(os.path.abspath(os.path.expanduser(WORKDIR.value)))
  if not configs.looks_ahead(config.model):
    raise cli.UsageError(f'{WORKDIR.value}: a {config.model.ffn} model without mixture-of-'
                         'depths routes causally already; it needs no auxiliary routers')
  run = saved_run.load(WORKDIR.value, with_aux_routers=False)
  done = aux_store.read_result(run.workdir)
  mods = list(config.model.modalities)
  if done is not None and done.get('run_step') == run.step and not FORCE.value:
    print(f'{PROG}: {aux_store.directory(run.workdir)} is done for step {run.step} '
          '(--force trains again)', file=sys.stderr)
    print(json.dumps(done) if JSON.value else table(done, mods))
    return

  tok = pipeline.load_tokenizers(config)
  data_checks.check(config, tok)       # before anything is written
  joint = run.model.aux_routers
  model = run.model if joint else transformer.build(config, aux_routers=True)
  params = run.params
  try:
    os.makedirs(aux_store.directory(run.workdir), exist_ok=True)
    if not joint:
      aux_store.mark_unfinished(run.workdir)   # until the new routers are saved
  except OSError as e:
    raise cli.UsageError(f'cannot write {aux_store.directory(run.workdir)} '
                         f'({e.strerror or e})') from e
  log = metrics_log.MetricsLog(aux_store.directory(run.workdir), resume_step=0,
                               total_steps=STEPS.value)
  try:
    if not joint:
      print(f'{PROG}: training auxiliary routers of {run.workdir} (step {run.step}) for '
            f'{STEPS.value} steps of {config.train.batch_size} x {config.data.seq_len}',
            file=sys.stderr, flush=True)

      def on_row(step, row):
        log.write(step, row)
        print(f'  step {step:>5}/{STEPS.value}  loss {row["aux_router/loss"]:.4f}  '
              f'balanced accuracy {row["aux_router/balanced_accuracy"]:.3f}',
              file=sys.stderr, flush=True)
      fresh = aux_stage.init_aux_params(model, SEED.value)
      aux = aux_stage.train_routers(model, aux_store.merge(run.params, fresh), config, tok,
                                    steps=STEPS.value, lr=LR.value, on_row=on_row)
      params = aux_store.merge(run.params, aux)
    print(f'{PROG}: evaluating teacher-forced and causal', file=sys.stderr, flush=True)
    result = aux_stage.evaluate_modes(model, params, config, tok)
    result.update(run_step=run.step, train_flops=run.progress.get('train_flops'),
                  steps=0 if joint else STEPS.value, lr=LR.value, mode=(
                      'joint' if joint else 'post_hoc'))
    log.write(STEPS.value if not joint else 0, {k: v for k, v in result.items()
                                                 if isinstance(v, (int, float))})
  finally:
    log.close()
  aux_store.save(run.workdir, aux_store.split(params)[1], result)
  print(json.dumps(result) if JSON.value else table(result, mods))


def run(argv: list[str] | None = None) -> None:
  """Console script entry point (`moma-aux`); argv[0] is the program name."""
  cli.run_main(main, argv, prog=PROG, usage=__doc__, with_config=False,
               user_errors=(*pipeline.DATA_ERRORS, run_dir.RunDirError))


if __name__ == '__main__':
  run(sys.argv)
