"""The tables and figures of docs/REPRODUCTION.md, from the runs of experiments/repro_small.sh.

  python experiments/repro_small_report.py --runs runs/repro_small [--figures docs]

Reads every run's metrics.jsonl and aux_router/result.json (nothing is trained) and
writes RUNS/report.md:
  1. eta per modality (text, image, overall), from the training loss and from the
     evaluation loss, at mid-training and at the end, for every sparse variant against
     the seed-0 dense run, next to the paper's (1.4B, 1T tokens);
  2. the seed-to-seed spread: final losses of the two dense seeds and of the two 4t4i
     seeds, and 4t4i's eta against each dense seed;
  3. teacher-forced vs causal evaluation loss per variant (post-hoc auxiliary routers)
     and the routers' balanced accuracy;
  4. route/dropped and route/left_behind at the end (what the routing did);
and the figures repro_small_loss.png, repro_small_eta.png into --figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

from moma_jax.analysis import savings
from moma_jax.analysis import savings_report

SPARSE = ('1t1i', '4t4i', 'moe_8x', 'mod_1t1i', 'mod_4t4i')
MODS = ('text', 'image', 'overall')
# The paper's eta at 1.4B parameters and 1T tokens (text, image, overall); None: not given.
PAPER = {'4t4i': (2.6, 5.2, 3.7), 'moe_8x': (3.0, 2.8, 3.0), 'mod_4t4i': (3.4, 5.3, 4.2),
         '1t1i': (None, None, None), 'mod_1t1i': (None, None, None)}


def _eta_cell(row: savings.Row | None) -> str:
  if row is None:
    return '-'
  if row.bound:
    return f'>{row.eta:.2f}'
  return f'{row.eta:.2f}{"*" if row.extrapolated else ""}'


def _at_step(rows, run, source, modality, step):
  """The row of `run` nearest to `step` (at or before it)."""
  pick = [r for r in rows if r.run == run and r.source == source and r.modality == modality
          and r.step <= step]
  return max(pick, key=lambda r: r.step) if pick else None


def eta_table(rows, names, source, mid_step, end_step) -> list[str]:
  out = [f'| variant | mid (step {mid_step}) text / image / overall | end (step {end_step}) '
         'text / image / overall | last measured text / image / overall | paper |',
         '|---|---|---|---|---|']
  last_measured = savings.final_rows(rows, measured_only=True)
  for name in names:
    mid = ' / '.join(_eta_cell(_at_step(rows, name, source, m, mid_step)) for m in MODS)
    end = ' / '.join(_eta_cell(_at_step(rows, name, source, m, end_step)) for m in MODS)
    meas = last_measured.get((name, source), {})
    measured = ' / '.join(
        f'{_eta_cell(meas.get(m))} (s{meas[m].step})' if m in meas else '-' for m in MODS)
    paper = ' / '.join('-' if v is None else f'{v}' for v in PAPER[name.split('_seed')[0]])
    out.append(f'| {name} | {mid} | {end} | {measured} | {paper} |')
  return out


def _last(rows: list[dict], key: str):
  vals = [r[key] for r in rows if r.get(key) is not None]
  return vals[-1] if vals else None


def _fmt(v, p=3) -> str:
  return '-' if v is None else f'{v:.{p}f}'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', default='runs/repro_small')
  parser.add_argument('--figures', default=None, help='folder for the two PNGs')
  args = parser.parse_args(argv)
  runs_dir = os.path.abspath(args.runs)
  have = lambda name: os.path.isfile(os.path.join(runs_dir, name, 'metrics.jsonl'))
  missing = [n for n in ('dense', *SPARSE) if not have(n)]
  if missing:
    print(f'repro_small_report: error: no runs {", ".join(missing)} in {runs_dir}',
          file=sys.stderr)
    return 2
  read = lambda name: savings.read_run(os.path.join(runs_dir, name), name)
  dense = read('dense')
  sparse = [read(n) for n in SPARSE]
  rows = savings.compare(dense, sparse, MODS, ('train', 'eval'))
  metrics = {n: [json.loads(l) for l in open(os.path.join(runs_dir, n, 'metrics.jsonl'))]
             for n in ('dense', *SPARSE, 'dense_seed1', '4t4i_seed1') if have(n)}
  end_step = max(r['step'] for r in metrics['dense'])
  mid_step = end_step // 2

  lines = [f'Runs: `{runs_dir}`; command: `bash experiments/repro_small.sh {args.runs}` '
           '(this report: `python experiments/repro_small_report.py --runs '
           f'{args.runs}`). `*` = extrapolated beyond the dense run\'s loss range '
           '(savings.py); `(sN)` = the step of the last point inside it.', '']
  for source, title in (('train', 'training loss'), ('eval', 'validation loss')):
    lines += [f'### eta from the {title}', '']
    lines += eta_table(rows, SPARSE, source, mid_step, end_step) + ['']

  # Seed spread.
  lines += ['### Seed spread', '', '| run | train loss (last 5 logged, mean) | eval loss '
            'overall / text / image |', '|---|---|---|']
  for name in ('dense', 'dense_seed1', '4t4i', '4t4i_seed1'):
    if name not in metrics:
      continue
    train = [r['loss'] for r in metrics[name] if 'loss' in r][-5:]
    ev = ' / '.join(_fmt(_last(metrics[name], k)) for k in
                    ('eval/loss', 'eval/loss/text', 'eval/loss/image'))
    lines.append(f'| {name} | {np.mean(train):.4f} | {ev} |')
  if have('dense_seed1') and have('4t4i_seed1'):
    lines += ['', '4t4i eta (last measured point; training loss / validation loss) against '
              'each dense seed:', '', '| 4t4i seed | dense seed | train text / image / '
              'overall | eval text / image / overall |', '|---|---|---|---|']
    for s4 in ('4t4i', '4t4i_seed1'):
      for sd in ('dense', 'dense_seed1'):
        r = savings.compare(read(sd), [read(s4)], MODS, ('train', 'eval'))
        fin = savings.final_rows(r, measured_only=True)
        cells = [' / '.join(_eta_cell(fin.get((s4, src), {}).get(m)) for m in MODS)
                 for src in ('train', 'eval')]
        lines.append(f'| {s4} | {sd} | {cells[0]} | {cells[1]} |')
  lines.append('')

  # Causal evaluation.
  lines += ['### Teacher-forced vs causal validation loss (post-hoc auxiliary routers)', '',
            '| variant | teacher-forced overall / text / image | causal overall / text / '
            'image | gap overall / text / image | router balanced accuracy (experts / MoD) |',
            '|---|---|---|---|---|']
  for name in SPARSE:
    path = os.path.join(runs_dir, name, 'aux_router', 'result.json')
    if not os.path.isfile(path):
      lines.append(f'| {name} | (no aux_router/result.json) | | | |')
      continue
    with open(path) as f:
      res = json.load(f)
    tf = ' / '.join(_fmt(res.get(k)) for k in ('eval/loss', 'eval/loss/text', 'eval/loss/image'))
    ca = ' / '.join(_fmt(res.get(k)) for k in ('eval_causal/loss', 'eval_causal/loss/text',
                                               'eval_causal/loss/image'))
    gap = ' / '.join(_fmt(res.get(k), 4) for k in ('gap', 'gap/text', 'gap/image'))
    experts = [res.get(f'aux_router/balanced_accuracy/{k}') for k in ('text', 'image', 'all')]
    experts = [v for v in experts if v is not None]
    acc = (f'{np.mean(experts):.3f}' if experts else '-') + ' / ' + _fmt(
        res.get('aux_router/balanced_accuracy/depth'))
    lines.append(f'| {name} | {tf} | {ca} | {gap} | {acc} |')
  lines.append('')

  # Routing at the end.
  lines += ['### Routing at the end of training', '', '| variant | dropped text / image / all '
            '| left behind text / image | MoD picked |', '|---|---|---|---|']
  for name in SPARSE:
    m = metrics[name]
    dropped = ' / '.join(_fmt(_last(m, f'route/dropped/{k}')) for k in ('text', 'image', 'all'))
    left = ' / '.join(_fmt(_last(m, f'route/left_behind/{k}')) for k in ('text', 'image'))
    lines.append(f'| {name} | {dropped} | {left} | {_fmt(_last(m, "route/mod/picked"))} |')
  lines.append('')

  report = os.path.join(runs_dir, 'report.md')
  with open(report, 'w') as f:
    f.write('\n'.join(lines))
  print('\n'.join(lines))
  print(f'report -> {report}')
  if args.figures:
    out = os.path.join(runs_dir, 'savings_all')
    os.makedirs(out, exist_ok=True)
    paths = savings_report.write_plots(dense, sparse, rows, out)
    os.makedirs(args.figures, exist_ok=True)
    for path, name in zip(paths, ('repro_small_loss.png', 'repro_small_eta.png')):
      shutil.copyfile(path, os.path.join(args.figures, name))
      print(f'figure -> {os.path.join(args.figures, name)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
