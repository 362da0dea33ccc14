"""moma-compare: FLOPs savings (eta) of sparse runs against a dense baseline run.

Usage:
  moma-compare --baseline DIR_dense --run DIR [--run DIR ...] --out OUT
               [--eval_only] [--modality text|image|overall ...] [--smooth DECADES]
               [--max_extrapolation FACTOR]
  python -m moma_jax.cli.compare --baseline runs/dense --run runs/moma_4t4i --out cmp

For every logged point of every run, eta_m = C_dense(L_m) / C: how many times more
training FLOPs the dense baseline needed to reach the run's loss L_m (per modality m
and overall), from the runs' `metrics.jsonl`. Method (smoothing in log-FLOPs, isotonic
dense curve, power-law extrapolation): moma_jax/analysis/savings.py; the files:
moma_jax/analysis/savings_report.py.

Writes into OUT (created if needed; other files there are left alone):
  savings.csv        run, modality, source, step, train_flops, loss, eta, extrapolated,
                     bound (eta is a lower bound)
  savings.md         eta per modality, evaluation losses first: at each run's last point
                     inside the dense run's range, then at its end (* = extrapolated)
  loss_vs_flops.png  loss vs training FLOPs, one panel per modality, all runs
  eta_vs_flops.png   eta vs training FLOPs, one panel per modality
and prints the table of savings.md and the paths written.

Training losses are compared, and evaluation losses too when the baseline and every run
have evaluation rows; --eval_only compares evaluation losses only. --modality (repeat
it) picks the modalities; default: the baseline's, then overall. --smooth sets the
smoothing half-width in decades of FLOPs (default 0.2 for training, 0.05 for
evaluation losses; 0 turns smoothing off). The dense run's power law is trusted up to
--max_extrapolation times its training FLOPs (default 2); beyond, and where the law
never reaches a run's loss, the table gives a lower bound: "> 1.90 (beyond the dense
run)".
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags

from moma_jax.analysis import savings
from moma_jax.analysis import savings_report
from moma_jax.cli import command as cli

PROG = 'moma-compare'
BASELINE = cli.define_once(flags.DEFINE_string, 'baseline', None,
                           'the dense baseline run directory')
RUNS = cli.define_once(flags.DEFINE_multi_string, 'run', None,
                       'a run directory to compare with the baseline; repeat for several')
OUT = cli.define_once(flags.DEFINE_string, 'out', None,
                      'the folder to write savings.csv, savings.md and the figures into')
EVAL_ONLY = cli.define_once(flags.DEFINE_bool, 'eval_only', False,
                            'compare evaluation losses only')
MODALITIES = cli.define_once(flags.DEFINE_multi_string, 'modality', None,
                             "a modality to compare, or 'overall'; repeat for several "
                             "(default: the baseline's modalities and overall)")
SMOOTH = cli.define_once(flags.DEFINE_float, 'smooth', None,
                         'smoothing half-width in decades of training FLOPs (default '
                         f"{savings.DEFAULT_SMOOTH['train']} for training, "
                         f"{savings.DEFAULT_SMOOTH['eval']} for evaluation losses)")

MAX_EXTRAPOLATION = cli.define_once(
    flags.DEFINE_float, 'max_extrapolation', savings.MAX_EXTRAPOLATION,
    "extrapolate the dense run's power law up to this multiple of its training FLOPs; "
    'beyond, eta is given as a lower bound')


def _arguments() -> tuple[str, list[str], str]:
  """(baseline, runs, out) from the flags; UsageError for a missing or bad one."""
  for holder in (BASELINE, RUNS, OUT):
    if not holder.value:
      raise cli.UsageError(f'--{holder.name} is required')
  if SMOOTH.value is not None and SMOOTH.value < 0:
    raise cli.UsageError(f'--smooth must be >= 0 decades, got {SMOOTH.value:g}')
  if os.path.exists(OUT.value) and not os.path.isdir(OUT.value):
    raise cli.UsageError(f'--out {OUT.value} exists and is not a folder')
  return BASELINE.value, list(RUNS.value), OUT.value


def _sources(baseline: savings.Run, runs: Sequence[savings.Run]) -> tuple[str, ...]:
  """('eval',) with --eval_only; else 'train', and 'eval' when every run has eval rows."""
  if EVAL_ONLY.value:
    for run in (baseline, *runs):
      if not any(source == 'eval' for source, _ in run.curves):
        raise cli.UsageError(f'--eval_only: {run.workdir} has no evaluation rows')
    return ('eval',)
  if all(any(s == 'eval' for s, _ in run.curves) for run in (baseline, *runs)):
    return ('train', 'eval')
  return ('train',)


def main() -> None:
  baseline_dir, run_dirs, out = _arguments()
  names = savings.run_names([baseline_dir, *run_dirs])
  baseline = savings.read_run(baseline_dir, names[0])
  runs = [savings.read_run(d, n) for d, n in zip(run_dirs, names[1:])]
  sources = _sources(baseline, runs)
  rows = savings.compare(baseline, runs, MODALITIES.value or None, sources, SMOOTH.value,
                         MAX_EXTRAPOLATION.value)
  # Everything is read and computed before OUT is touched: a bad input writes nothing.
  try:
    os.makedirs(out, exist_ok=True)
    paths = [savings_report.write_csv(rows, os.path.join(out, 'savings.csv'))]
    path = os.path.join(out, 'savings.md')
    table = savings_report.write_markdown(rows, baseline, path, SMOOTH.value,
                                          MAX_EXTRAPOLATION.value)
    paths += [path, *savings_report.write_plots(baseline, runs, rows, out, SMOOTH.value)]
  except OSError as e:
    raise cli.UsageError(f'cannot write into --out {out}: {e}') from e
  print(table)
  print('wrote ' + ', '.join(paths))


def run(argv: Sequence[str] | None = None) -> None:
  """Console script entry point (`moma-compare`); argv[0] is the program name."""
  cli.run_main(main, argv, prog=PROG, usage=__doc__, with_config=False,
               user_errors=(savings.InputError,))


if __name__ == '__main__':
  run(sys.argv)
