"""The tables and figures of docs/REPRODUCTION.md, from the runs of experiments/repro_small.sh.

  python experiments/repro_small_report.py --runs runs/repro_small [--figures docs]

Reads every run's metrics.jsonl and aux_router/result.json (nothing is trained or
evaluated: every evaluation loss is the one training logged, on the validation splits
mixed and packed as training's batches) and writes RUNS/report.md:
  1. eta per modality (text, image, overall), from the training loss and from the
     evaluation loss, at mid-training and at the end, for every sparse variant against
     the seed-0 dense run, next to the paper's (1.4B, 1T tokens);
  2. the seed-to-seed spread: final losses of the two seeds of dense, 4t4i and moe_8x,
     and the eta of 4t4i and moe_8x against each dense seed;
  3. teacher-forced vs causal evaluation loss of the runs of CAUSAL (post-hoc auxiliary
     routers) at threshold 0.5 and at the compute-matched thresholds, with the forward
     FLOPs per token of each mode, the held-out shares the calibrated experts took, and
     the routers' balanced accuracy;
  4. route/dropped and route/left_behind at the end (what the routing did);
  5. what moe_8x's experts took, per modality, and the validation loss per dataset;
     the routing bias of evaluating each dataset's split alone (BIAS_RUNS'
     eval_split.json, `moma-eval --per_split`) against the mixed batches;
  6. the upcycling controls: the paper's recipe and one change of it each (UPCYCLED of
     experiments/repro_small.py), each seed, against 4t4i from scratch and the source;
and the figures repro_small_loss.png, repro_small_eta.png, repro_small_moe.png and
repro_small_upcycling.png into --figures.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np

from moma_jax.analysis import savings
from moma_jax.analysis import savings_report


def _experiment():
  """experiments/repro_small.py, the study's variants."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'repro_small.py')
  spec = importlib.util.spec_from_file_location('repro_small', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


REPRO = _experiment()
SPARSE = ('1t1i', '4t4i', 'moe_8x', 'mod_1t1i', 'mod_4t4i', 'mod_4t4i_aware', 'up_4t4i')
# The upcycling controls and their second seeds (those that exist are reported).
UPCYCLED = tuple(REPRO.UPCYCLED)
UPCYCLED_RUNS = tuple(n for name in UPCYCLED for n in (name, f'{name}_seed1'))
SEEDS = {'dense': 'dense_seed1', '4t4i': '4t4i_seed1'}
MODS = ('text', 'image', 'overall')
# The paper's eta at 1.4B parameters and 1T tokens (text, image, overall); None: not given.
# Upcycling: the paper reports a further 1.2x over 4t4i overall (not per modality).
PAPER = {'4t4i': (2.6, 5.2, 3.7), 'moe_8x': (3.0, 2.8, 3.0), 'mod_4t4i': (3.4, 5.3, 4.2)}
# The moe_8x diagnosis compares these runs (those that exist).
MOE_RUNS = ('dense', '4t4i', 'moe_8x')
# The runs experiments/repro_small.sh evaluates split by split too (eval_split.json).
BIAS_RUNS = ('dense', '4t4i', 'moe_8x')
# (label, metric key after 'eval/' or 'eval_split/') of the bias table.
BIAS_KEYS = (('pydoc text', 'moma_pydoc/loss/text'), ('captions', 'moma_shapes/loss/text'),
             ('image', 'moma_shapes/loss/image'))
# The runs experiments/repro_small.sh evaluates causally (moma-aux).
CAUSAL = ('1t1i', '4t4i', 'moe_8x', 'mod_4t4i')
LAYERS = 4
# Gumbel-sigmoid noise z + G' - G'' is standard logistic: std pi / sqrt(3).
LOGISTIC_STD = np.pi / np.sqrt(3.0)


def _eta_cell(row: savings.Row | None) -> str:
  if row is None:
    return '-'
  if row.bound:
    return f'>{row.eta:.2f}'
  return f'{row.eta:.2f}{"*" if row.extrapolated else ""}'


def step_offset(runs_dir: str, name: str) -> int:
  """The steps a run's own step count leaves out: an upcycled run counts from 0 at its
  source's step `upcycle.at_step`, so its step s is the study's step s + at_step."""
  with open(os.path.join(runs_dir, name, 'config.json')) as f:
    return int(json.load(f).get('upcycle', {}).get('at_step') or 0)


def _at_step(rows, run, source, modality, step, offset=0):
  """The row of `run` nearest to the study's `step` (at or before it)."""
  pick = [r for r in rows if r.run == run and r.source == source and r.modality == modality
          and r.step + offset <= step]
  return max(pick, key=lambda r: r.step) if pick else None


def eta_table(rows, names, source, mid_step, end_step, offsets) -> list[str]:
  """Steps are the study's: `offsets[name]` (step_offset) added to a run's own."""
  out = [f'| variant | mid (step {mid_step}) text / image / overall | end (step {end_step}) '
         'text / image / overall | last measured text / image / overall | paper |',
         '|---|---|---|---|---|']
  last_measured = savings.final_rows(rows, measured_only=True)
  for name in names:
    at = lambda m, step: _at_step(rows, name, source, m, step, offsets[name])
    mid = ' / '.join(_eta_cell(at(m, mid_step)) for m in MODS)
    end = ' / '.join(_eta_cell(at(m, end_step)) for m in MODS)
    meas = last_measured.get((name, source), {})
    measured = ' / '.join(f'{_eta_cell(meas.get(m))} (s{meas[m].step + offsets[name]})'
                          if m in meas else '-' for m in MODS)
    paper = ' / '.join('-' if v is None else f'{v}'
                       for v in PAPER.get(name.split('_seed')[0], (None,) * 3))
    out.append(f'| {name} | {mid} | {end} | {measured} | {paper} |')
  return out


def _last(rows: list[dict], key: str):
  vals = [r[key] for r in rows if r.get(key) is not None]
  return vals[-1] if vals else None


def _fmt(v, p=3) -> str:
  return '-' if v is None else f'{v:.{p}f}'


def _series(rows: list[dict], key: str):
  """(steps, values) of `key` over the rows that have it."""
  pts = [(r['step'], r[key]) for r in rows if r.get(key) is not None]
  return [p[0] for p in pts], [p[1] for p in pts]


def _text_slots(row: dict, layer: int) -> float | None:
  """The share of a layer's expert slots that went to text tokens in one logged row."""
  text = [row.get(f'route/layer{layer}/tokens_per_expert/text/{e}') for e in range(8)]
  total = [row.get(f'route/layer{layer}/tokens_per_expert/{e}') for e in range(8)]
  if None in text or None in total:
    return None
  return sum(text) / sum(total)


def _train_rows(rows):
  return [r for r in rows if 'loss' in r and 'route/layer0/tokens_per_expert/0' in r]


def seed_section(metrics, read, have, mid_step) -> list[str]:
  lines = ['### Seed spread', '', '| run | train loss (last 5 logged, mean) | eval loss '
           'overall / text / image |', '|---|---|---|']
  for base, other in SEEDS.items():
    for name in (base, other):
      if name not in metrics:
        continue
      train = [r['loss'] for r in metrics[name] if 'loss' in r][-5:]
      ev = ' / '.join(_fmt(_last(metrics[name], k)) for k in
                      ('eval/loss', 'eval/loss/text', 'eval/loss/image'))
      lines.append(f'| {name} | {np.mean(train):.4f} | {ev} |')
  base = '4t4i'
  pair = (base, SEEDS[base])
  if have('dense_seed1') and all(have(n) for n in pair):
    lines += ['', f'{base} eta (last measured point; training loss / validation loss; '
              f'validation loss at step {mid_step}) against each dense seed:', '',
              f'| {base} seed | dense seed | train text / image / overall | eval text / '
              f'image / overall | eval at step {mid_step} text / image / overall |',
              '|---|---|---|---|---|']
    for sparse in pair:
      for sd in ('dense', 'dense_seed1'):
        r = savings.compare(read(sd), [read(sparse)], MODS, ('train', 'eval'))
        fin = savings.final_rows(r, measured_only=True)
        cells = [' / '.join(_eta_cell(fin.get((sparse, src), {}).get(m)) for m in MODS)
                 for src in ('train', 'eval')]
        mid = ' / '.join(_eta_cell(_at_step(r, sparse, 'eval', m, mid_step)) for m in MODS)
        lines.append(f'| {sparse} | {sd} | {cells[0]} | {cells[1]} | {mid} |')
  return lines + ['']


def _shares(res: dict, mode: str) -> list[float]:
  """Every expert's (and MoD layer's) held-out share under `mode`, over all routers."""
  prefix = f'usage/{mode}/share/'
  out = []
  for key, value in res.items():
    if key.startswith(prefix) and not key.endswith(('/text', '/image')):
      out += list(value)
  return out


def causal_section(runs_dir, names) -> list[str]:
  lines = ['### Teacher-forced vs causal validation loss (post-hoc auxiliary routers)', '',
           'On the evaluation batches (the validation splits mixed and packed as in '
           'training, so routing groups hold what training\'s hold). Causal at the '
           'paper\'s threshold 0.5 and at the compute-matched thresholds '
           '(calibrated on 2^16 training tokens, the study\'s `moma-aux '
           '--calibration_tokens`). Forward MFLOPs per token: teacher-forced '
           'analytic; causal as routed on 2^18 mixed validation tokens, auxiliary routers '
           'included.', '',
           '| variant | teacher-forced overall / text / image | causal 0.5 | causal '
           'matched | gap 0.5 | gap matched | MFLOPs/token TF / 0.5 / matched | held-out '
           'shares at 0.5 / matched (min-max) | balanced accuracy (experts / MoD) |',
           '|---|---|---|---|---|---|---|---|---|']
  for name in names:
    path = os.path.join(runs_dir, name, 'aux_router', 'result.json')
    if not os.path.isfile(path):
      lines.append(f'| {name} | (no aux_router/result.json) | | | | | | | |')
      continue
    with open(path) as f:
      res = json.load(f)
    three = lambda prefix, p=3: ' / '.join(_fmt(res.get(f'{prefix}{k}'), p)
                                           for k in ('', '/text', '/image'))
    fl = ' / '.join(_fmt(res.get(f'flops/{m}', 0) / 1e6, 3) for m in
                    ('eval', 'eval_causal', 'eval_causal_calibrated'))
    sh = ' / '.join(f'{min(v):.2f}-{max(v):.2f}' if v else '-' for v in
                    (_shares(res, 'eval_causal'), _shares(res, 'eval_causal_calibrated')))
    experts = [res.get(f'aux_router/balanced_accuracy/{k}') for k in ('text', 'image', 'all')]
    experts = [v for v in experts if v is not None]
    acc = (f'{np.mean(experts):.3f}' if experts else '-') + ' / ' + _fmt(
        res.get('aux_router/balanced_accuracy/depth'))
    lines.append(f'| {name} | {three("eval/loss")} | {three("eval_causal/loss")} | '
                 f'{three("eval_causal_calibrated/loss")} | {three("gap", 4)} | '
                 f'{three("gap_calibrated", 4)} | {fl} | {sh} | {acc} |')
  return lines + ['']


def moe_section(metrics) -> list[str]:
  """End-of-training numbers of the moe_8x diagnosis (the figure shows them over time)."""
  lines = ['### The moe_8x diagnosis', '', '| run | text share of tokens | text share of '
           'expert slots, layers 0-3 | experts taking >90% one modality | left behind text '
           '/ image | router logit std | validation loss pydoc / captions / image |',
           '|---|---|---|---|---|---|---|']
  for name in MOE_RUNS:
    if name not in metrics:
      continue
    rows = _train_rows(metrics[name])
    last = rows[-5:] if rows else []
    tok = [r['batch_tokens/text'] / (r['batch_tokens/text'] + r['batch_tokens/image'])
           for r in metrics[name] if 'batch_tokens/text' in r][-50:]
    slots = [np.mean([_text_slots(r, l) for r in last]) if last and
             _text_slots(last[-1], l) is not None else None for l in range(LAYERS)]
    pure = None
    if last and _text_slots(last[-1], 0) is not None:
      pure = 0
      for l in range(LAYERS):
        for e in range(8):
          t = np.mean([r[f'route/layer{l}/tokens_per_expert/text/{e}'] for r in last])
          a = np.mean([r[f'route/layer{l}/tokens_per_expert/{e}'] for r in last])
          pure += int(t > 0.9 * a or t < 0.1 * a)
    m = metrics[name]
    std = _last(m, 'route/router_logit_std/all')
    if std is None:
      std = np.mean([v for v in (_last(m, 'route/router_logit_std/text'),
                                 _last(m, 'route/router_logit_std/image')) if v is not None]
                    or [np.nan])
    ev = ' / '.join(_fmt(_last(m, k)) for k in ('eval/moma_pydoc/loss/text',
                                                 'eval/moma_shapes/loss/text',
                                                 'eval/loss/image'))
    lines.append(
        f'| {name} | {np.mean(tok):.3f} | '
        f'{" / ".join(_fmt(v, 2) for v in slots)} | '
        f'{"-" if pure is None else f"{pure} of 32"} | '
        f'{_fmt(_last(m, "route/left_behind/text"))} / '
        f'{_fmt(_last(m, "route/left_behind/image"))} | {_fmt(std, 2)} | {ev} |')
  return lines + ['']


def bias_section(runs_dir, metrics) -> list[str]:
  """Each dataset's validation loss with its split routed alone (eval_split.json) and on
  the mixed batches (the run's last evaluation), and the difference of the two beyond
  dense's (dense routes nothing: its difference is the two token sets')."""
  lines = ['### The routing bias of evaluating one dataset per routing group', '',
           'Per dataset: split alone / mixed batches (difference, beyond dense\'s).', '',
           '| run | ' + ' | '.join(label for label, _ in BIAS_KEYS) + ' |',
           '|---|' + '---|' * len(BIAS_KEYS)]
  split = {}
  for name in BIAS_RUNS:
    path = os.path.join(runs_dir, name, 'eval_split.json')
    if name in metrics and os.path.isfile(path):
      with open(path) as f:
        split[name] = json.load(f)
  diff = lambda n, k: split[n][f'eval_split/{k}'] - _last(metrics[n], f'eval/{k}')
  for name, res in split.items():
    cells = []
    for _, key in BIAS_KEYS:
      own = diff(name, key)
      beyond = '' if name == 'dense' or 'dense' not in split else \
          f', {own - diff("dense", key):+.3f}'
      cells.append(f'{res[f"eval_split/{key}"]:.3f} / {_last(metrics[name], f"eval/{key}"):.3f} '
                   f'({own:+.3f}{beyond})')
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return lines + ['']


def moe_figure(metrics, path: str) -> None:
  """Six panels: moe_8x's experts by modality at the end (per layer), the text share of
  expert slots over training, left-behind text and image, router logit spread, and the
  validation loss on pydoc text and on captions, for the runs of MOE_RUNS."""
  fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))
  rows = _train_rows(metrics['moe_8x'])[-5:]
  grid = np.asarray([[np.mean([r[f'route/layer{l}/tokens_per_expert/text/{e}'] /
                               r[f'route/layer{l}/tokens_per_expert/{e}'] for r in rows])
                      for e in range(8)] for l in range(LAYERS)])
  im = ax[0, 0].imshow(grid, vmin=0, vmax=1, cmap='coolwarm', aspect='auto')
  ax[0, 0].set(title='moe_8x at the end: text share of each expert\'s tokens',
               xlabel='expert', ylabel='layer', xticks=range(8), yticks=range(LAYERS))
  for (l, e), v in np.ndenumerate(grid):
    ax[0, 0].text(e, l, f'{v:.2f}', ha='center', va='center', fontsize=8)
  fig.colorbar(im, ax=ax[0, 0])
  colors = dict(zip(MOE_RUNS, ('black', 'tab:green', 'tab:red', 'tab:orange')))
  for name in MOE_RUNS:
    if name not in metrics:
      continue
    m, c = metrics[name], colors[name]
    tr = _train_rows(m)
    if tr and _text_slots(tr[0], 0) is not None:
      steps = [r['step'] for r in tr]
      share = [np.mean([_text_slots(r, l) for l in range(LAYERS)]) for r in tr]
      ax[0, 1].plot(steps, share, color=c, label=name)
    if name.startswith('moe') or name == '4t4i':
      for mod, style in (('text', '-'), ('image', '--')):
        ax[0, 2].plot(*_series(m, f'route/left_behind/{mod}'), style, color=c,
                      label=f'{name} {mod}')
      key = 'route/router_logit_std/all' if name.startswith('moe') else \
          'route/router_logit_std/text'
      ax[1, 0].plot(*_series(m, key), color=c, label=name)
    ax[1, 1].plot(*_series(m, 'eval/moma_pydoc/loss/text'), 'o-', color=c, label=name)
    ax[1, 2].plot(*_series(m, 'eval/moma_shapes/loss/text'), 'o-', color=c, label=name)
  tok = [(r['step'], r['batch_tokens/text'] / (r['batch_tokens/text'] +
                                               r['batch_tokens/image']))
         for r in metrics['moe_8x'] if 'batch_tokens/text' in r]
  ax[0, 1].axhline(np.mean([t for _, t in tok]), color='gray', ls=':',
                   label='text share of tokens')
  ax[0, 1].set(title='text share of expert slots (mean over layers)', xlabel='step',
               ylim=(0, 1))
  ax[0, 2].set(title='left behind (no expert), text - / image --', xlabel='step')
  ax[1, 0].set(title='router logit std (4t4i: text group)', xlabel='step')
  ax[1, 1].set(title='validation loss, pydoc text', xlabel='step')
  ax[1, 2].set(title='validation loss, captions (moma_shapes text)', xlabel='step')
  for a in (ax[0, 1], ax[0, 2], ax[1, 0], ax[1, 1], ax[1, 2]):
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _recipe(name: str) -> str:
  """What an upcycled run changes of the paper's recipe (repro_small.UPCYCLED)."""
  change = REPRO.UPCYCLED[name.split('_seed')[0]]
  return ', '.join(f'{k}={v}' for k, v in change.items()) or "the paper's recipe"


def _eval_at(rows: list[dict], step: int, key: str = 'eval/loss'):
  """`key` of the evaluation row at the run's own `step` (None if not logged)."""
  return next((r[key] for r in rows if r['step'] == step and key in r), None)


def upcycling_section(metrics, read, offsets) -> list[str]:
  """The controls of the upcycling recipe against 4t4i from scratch (the same total
  FLOPs) and the 1t1i source trained on; every loss on the mixed validation batches."""
  names = [n for n in UPCYCLED_RUNS if n in metrics]
  refs = [n for n in ('dense', 'dense_seed1', '1t1i', '4t4i', '4t4i_seed1') if n in metrics]
  rows = savings.compare(read('dense'), [read(n) for n in (*refs[1:], *names)], MODS,
                         ('eval',))
  last = savings.final_rows(rows)
  lines = ['### Upcycling: the recipe and its controls', '',
           'Validation loss on the mixed batches (overall / text / image) at the end '
           '(step 600, the same total training FLOPs for every run), 100 steps after '
           'the upcycling against the source trained on, eta at the end against dense; '
           'at the end: tokens left behind and the router logits\' std (text / image '
           f'groups) against the noise\'s ({LOGISTIC_STD:.2f} unscaled).', '',
           '| run | change | upcycled at | final eval loss | eval overall 100 steps after '
           '(source there) | eta at the end (overall) | left behind text / image | '
           'router logit std text / image |', '|---|---|---|---|---|---|---|---|']
  for name in (*refs, *names):
    m = metrics[name]
    final = ' / '.join(_fmt(_last(m, k)) for k in ('eval/loss', 'eval/loss/text',
                                                    'eval/loss/image'))
    at = offsets.get(name, 0)
    after = source = '-'
    if name in names:
      after = _fmt(_eval_at(m, 100))
      source = _fmt(_eval_at(metrics['1t1i'], at + 100))
    eta = last.get((name, 'eval'), {}).get('overall')
    std = ' / '.join(_fmt(_last(m, f'route/router_logit_std/{g}'), 2)
                     for g in ('text', 'image'))
    left = ' / '.join(_fmt(_last(m, f'route/left_behind/{g}')) for g in ('text', 'image'))
    change = _recipe(name) if name in names else 'from scratch'
    lines.append(f'| {name} | {change} | {at if name in names else "-"} | {final} | '
                 f'{after} ({source}) | {_eta_cell(eta) if name != "dense" else "1"} | '
                 f'{left} | {std} |')
  return lines + ['']


def upcycling_figure(metrics, offsets, path: str) -> None:
  """Validation loss, smoothed training loss and learning rate over the study's steps,
  for dense, 1t1i, 4t4i and every upcycled run (seed 1 dashed)."""
  fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
  names = [n for n in ('dense', '1t1i', '4t4i', *UPCYCLED_RUNS) if n in metrics]
  colors = dict(zip(('dense', '1t1i', '4t4i', *UPCYCLED),
                    ('black', 'tab:gray', 'tab:green', 'tab:red', 'tab:blue', 'tab:orange',
                     'tab:purple', 'tab:brown', 'tab:pink')))
  for name in names:
    m, off = metrics[name], offsets.get(name, 0)
    style = dict(color=colors[name.split('_seed')[0]], ls='--' if 'seed1' in name else '-',
                 label=name)
    steps, loss = _series(m, 'eval/loss')
    ax[0].plot([s + off for s in steps], loss, 'o', ms=3, **style)
    steps, loss = _series(m, 'loss')
    window = 5
    smooth = np.convolve(loss, np.ones(window) / window, mode='valid')
    ax[1].plot([s + off for s in steps[window - 1:]], smooth, **style)
    steps, lr = _series(m, 'lr')
    ax[2].plot([s + off for s in steps], lr, **style)
  ax[0].set(title='validation loss (mixed batches)', xlabel='study step', ylim=(None, 1.2))
  ax[1].set(title='training loss (mean of 5 logged rows)', xlabel='study step',
            xlim=(50, None), ylim=(None, 1.6))
  ax[2].set(title='learning rate', xlabel='study step')
  for a in ax:
    a.grid(alpha=0.3)
  ax[0].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', default='runs/repro_small')
  parser.add_argument('--figures', default=None, help='folder for the four PNGs')
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
             for n in ('dense', *SPARSE, *SEEDS.values(), *UPCYCLED_RUNS) if have(n)}
  end_step = max(r['step'] for r in metrics['dense'])
  mid_step = end_step // 2
  offsets = {n: step_offset(runs_dir, n) for n in metrics}

  lines = [f'Runs: `{runs_dir}`; command: `bash experiments/repro_small.sh {args.runs}` '
           '(this report: `python experiments/repro_small_report.py --runs '
           f'{args.runs}`). `*` = extrapolated beyond the dense run\'s loss range '
           '(savings.py); `(sN)` = the step of the last point inside it.', '']
  for source, title in (('train', 'training loss'), ('eval', 'validation loss')):
    lines += [f'### eta from the {title}', '']
    lines += eta_table(rows, SPARSE, source, mid_step, end_step, offsets) + ['']
  lines += seed_section(metrics, read, have, mid_step)
  lines += causal_section(runs_dir, CAUSAL)

  # Routing at the end.
  lines += ['### Routing at the end of training', '', '| variant | dropped text / image / all '
            '| left behind text / image | MoD picked |', '|---|---|---|---|']
  for name in SPARSE:
    m = metrics[name]
    dropped = ' / '.join(_fmt(_last(m, f'route/dropped/{k}')) for k in ('text', 'image', 'all'))
    left = ' / '.join(_fmt(_last(m, f'route/left_behind/{k}')) for k in ('text', 'image'))
    lines.append(f'| {name} | {dropped} | {left} | {_fmt(_last(m, "route/mod/picked"))} |')
  lines.append('')
  lines += moe_section(metrics)
  lines += bias_section(runs_dir, metrics)
  lines += upcycling_section(metrics, read, offsets)

  report = os.path.join(runs_dir, 'report.md')
  with open(report, 'w') as f:
    f.write('\n'.join(lines))
  print('\n'.join(lines))
  print(f'report -> {report}')
  if args.figures:
    out = os.path.join(runs_dir, 'savings_all')
    os.makedirs(out, exist_ok=True)
    paths = savings_report.write_plots(dense, sparse, rows, out)
    moe = os.path.join(out, 'moe_diagnosis.png')
    moe_figure(metrics, moe)
    up = os.path.join(out, 'upcycling.png')
    upcycling_figure(metrics, offsets, up)
    os.makedirs(args.figures, exist_ok=True)
    for path, name in zip((*paths, moe, up), ('repro_small_loss.png', 'repro_small_eta.png',
                                              'repro_small_moe.png',
                                              'repro_small_upcycling.png')):
      shutil.copyfile(path, os.path.join(args.figures, name))
      print(f'figure -> {os.path.join(args.figures, name)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
