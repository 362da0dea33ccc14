"""moma-eval: evaluate a training run's checkpoint on the validation splits.

Usage:
  moma-eval --workdir DIR [--step N] [--max_batches N] [--causal] [--per_split] [--json]
            [--config.mesh.fsdp=8 ...]

Restores the newest checkpoint of DIR (or step N), evaluates it teacher-forced on the
evaluation batches (the `data.eval_split` of every dataset of the run's mixture, mixed
and packed as training's batches, so routing groups hold what training's hold:
moma_jax/runs/evaluation.py), and prints the loss overall, per modality and per dataset
(`--json`: one JSON object with the metrics.jsonl keys). Reads DIR, writes nothing.
`--max_batches` overrides the run's `train.eval_max_batches` (0: until a split is used
up). `--per_split` adds the diagnostic that reads each dataset's split on its own
(`eval_split/...`), where a routing group holds one dataset. `--causal` evaluates in causal mode instead (routing by the
auxiliary routers, token by token), for runs that have them (`moma-aux`, or joint
training): at threshold 0.5 (keys `eval_causal/...`) and, where `moma-aux` calibrated
them for this step, at the compute-matched thresholds (`eval_causal_calibrated/...`),
each with its forward FLOPs per token as routed on mixed validation batches
(`flops/...`; moma_jax/inference/aux_stage.py).

`--config.mesh.data/fsdp/expert/tensor=N` (the others 1; -1: the devices left over)
opens the run sharded over the devices of every process by the training rules, for a
run larger than one device; without them it runs on one device. The numbers are the
one-device ones up to float rounding (sums split over devices add in another order).
"""
from __future__ import annotations

import json
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
from moma_jax.model import sharding
from moma_jax import run_dir
from moma_jax.runs import evaluation

PROG = 'moma-eval'
WORKDIR = cli.define_once(flags.DEFINE_string, 'workdir', None,
                          'the run directory (moma-train --workdir)')
STEP = cli.define_once(flags.DEFINE_integer, 'step', None,
                       'checkpoint step (default: the newest)')
MAX_BATCHES = cli.define_once(
    flags.DEFINE_integer, 'max_batches', None,
    "evaluation batches (default: the run's train.eval_max_batches; 0: until a split is "
    'used up)')
JSON = cli.define_once(flags.DEFINE_bool, 'json', False,
                       'print one JSON object instead of a table')
CAUSAL = cli.define_once(flags.DEFINE_bool, 'causal', False,
                         'evaluate in causal mode (needs auxiliary routers)')
PER_SPLIT = cli.define_once(
    flags.DEFINE_bool, 'per_split', False,
    "also evaluate each dataset's split on its own (a diagnostic: its routing groups hold "
    'one dataset, which no training group does)')


CAUSAL_LABELS = {'eval_causal': 'causal, threshold 0.5',
                 'eval_causal_calibrated': 'causal, compute-matched thresholds'}


def table(metrics: dict[str, float], datasets: list[str], modalities: list[str],
          prefix: str = 'eval') -> str:
  """Rows: each dataset, then all together; columns: overall and each modality."""
  cols = ['loss', *(f'loss/{m}' for m in modalities)]
  lines = [f'{"":<20}' + ''.join(f'{c:>14}' for c in ('overall', *modalities))]
  for name, start in [*((d, f'{prefix}/{d}/') for d in datasets), ('all', f'{prefix}/')]:
    cells = [metrics.get(start + c) for c in cols]
    lines.append(f'{name:<20}' + ''.join(
        f'{"-":>14}' if v is None else f'{v:>14.4f}' for v in cells))
  return '\n'.join(lines)


def main(mesh_overrides: dict[str, int]) -> None:
  distributed.initialize()
  if not WORKDIR.value:
    raise cli.UsageError('--workdir DIR is required')
  if MAX_BATCHES.value is not None and MAX_BATCHES.value < 0:
    raise cli.UsageError(f'--max_batches must be >= 0, got {MAX_BATCHES.value}')
  mesh = saved.mesh_for(WORKDIR.value, mesh_overrides)
  run = saved_run.load(WORKDIR.value, STEP.value, mesh=mesh)
  config = run.config
  if MAX_BATCHES.value is not None:
    config.train.eval_max_batches = MAX_BATCHES.value or None
  model = run.model
  calibrated = False
  if CAUSAL.value:
    if configs.looks_ahead(config.model) and not model.mode.aux_routers:
      done = aux_store.read_result(run.workdir)
      if done is not None:
        raise cli.UsageError(f'--causal: the auxiliary routers of {run.workdir} were '
                             f'trained on step {done["run_step"]}, not {run.step}: '
                             f'--step {done["run_step"]}, or moma-aux again')
      raise cli.UsageError(f'--causal: {run.workdir} has no auxiliary routers; train them '
                           f'first: moma-aux --workdir {run.workdir}')
    done = aux_store.read_result(run.workdir)
    calibrated = (configs.looks_ahead(config.model) and done is not None
                  and done['run_step'] == run.step)
    if calibrated:
      step, run = run.step, None          # one copy of the parameters at a time
      run = saved_run.load(WORKDIR.value, step, mesh=mesh,
                           causal_thresholds=thresholds.CALIBRATED)
  tok = pipeline.load_tokenizers(config)
  data_checks.check(config, tok, (config.data.eval_split,))
  # Batches [B, L]: each process reads its rows, placed over the mesh's batch axes.
  batch_sh = sharding.batch_sharding(run.mesh)
  put = lambda batch: sharding.global_batch(batch, batch_sh)
  shardings = (jax.tree.map(lambda a: a.sharding, run.params), batch_sh)
  mods = config.model.modalities
  with jax.set_mesh(run.mesh), sharding.axis_rules():
    if CAUSAL.value:
      metrics = aux_stage.causal_modes(model, run.params, config, tok,
                                       calibrated=calibrated, put=put)
      prefixes = ['eval_causal', *(['eval_causal_calibrated'] if calibrated else [])]
    else:
      step_fn = evaluation.make_eval_step(model, mods, evaluation.datasets_of(config),
                                          shardings=shardings)
      metrics = evaluation.evaluate(step_fn, run.params, config, tok, put=put)
      prefixes = ['eval']
    if PER_SPLIT.value:
      split_model = model.in_mode(causal=True) if CAUSAL.value else model
      split_params = thresholds.at_half(run.params) if CAUSAL.value else run.params
      split_step = evaluation.make_eval_step(split_model, mods, shardings=shardings)
      metrics.update(evaluation.evaluate_per_split(split_step, split_params, config, tok,
                                                   put=put))
      prefixes.append(evaluation.SPLIT_PREFIX)
  if JSON.value:
    print(json.dumps({'step': run.step, 'train_flops': run.progress.get('train_flops'),
                      **metrics}))
    return
  print(f'{PROG}: {run.workdir} at step {run.step} '
        f'({run.progress.get("train_flops", 0):.4g} training FLOPs'
        f'{", causal mode" if CAUSAL.value else ""})')
  for prefix in prefixes:
    if prefix == evaluation.SPLIT_PREFIX:
      print("each dataset's split on its own (diagnostic: routing groups of one dataset)")
    elif CAUSAL.value:
      flops = ', '.join(f'{name} {metrics[key] / 1e6:.3f}' for name, key in (
          ('overall', f'flops/{prefix}'),
          *((m, f'flops/{prefix}/{m}') for m in config.model.modalities)))
      print(f'{CAUSAL_LABELS[prefix]} (forward MFLOPs per token as routed: {flops})')
    print(table(metrics, [n for n, _ in configs.mixture(config.data)],
                list(config.model.modalities), prefix))
  if CAUSAL.value and not calibrated and configs.looks_ahead(config.model):
    print(f'(no compute-matched thresholds for step {run.step}: moma-aux --workdir '
          f'{run.workdir} calibrates them)')


def run(argv: list[str] | None = None) -> None:
  """Console script entry point (`moma-eval`); argv[0] is the program name."""
  cli.run_main(main, argv, prog=PROG, usage=__doc__, with_config=False, with_mesh=True,
               user_errors=(*pipeline.DATA_ERRORS, run_dir.RunDirError))


if __name__ == '__main__':
  run(sys.argv)
