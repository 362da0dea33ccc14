"""moma-compare end to end on synthetic run directories with a known answer.

The dense run's losses follow power laws L(C) = a*C^-b + c; the sparse run's text,
image and overall losses at C are the dense ones at 2C, 4C and 3C, so eta is 2, 4 and 3
everywhere, extrapolated points included (the power law is the truth here). Each user
error ends as one line `moma-compare: error: ...` with exit code 2 and leaves OUT as it
was. In-process, except one subprocess run; the file takes a few seconds.
"""
import csv
import json
import os
import re
import subprocess
import sys

from matplotlib import image as mpimg
import numpy as np
import pytest

from moma_jax.cli import compare as compare_cli

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
LAWS = {'text': (30.0, 0.12, 1.5), 'image': (60.0, 0.15, 2.0), 'overall': (45.0, 0.13, 1.8)}
SPEEDUP = {'text': 2.0, 'image': 4.0, 'overall': 3.0}
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def law(flops, a, b, c):
  return a * flops**-b + c


def model_config(ffn='dense', mod=False, modalities=('text', 'image')):
  return {'model': {'ffn': ffn, 'experts': [4, 4], 'modalities': list(modalities),
                    'mod': {'enabled': mod, 'capacity': 0.25}},
          'train': {'steps': 100}}


def write_run(workdir, *, speedup=None, flops_per_step=1e12, steps=1000, log_every=1,
              eval_every=100, config=None, rows=None):
  """A run directory as moma-train writes it: config.json and metrics.jsonl.

  Training rows every `log_every` steps (loss, loss/{m}, and keys eta ignores), eval
  rows every `eval_every` steps (0: none), losses L_m(speedup_m * C).
  """
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config or model_config(), f)
  speedup = speedup or {}
  if rows is None:
    rows = []
    for step in range(1, steps + 1):
      flops = step * flops_per_step
      loss = {m: float(law(speedup.get(m, 1.0) * flops, *LAWS[m])) for m in LAWS}
      if step % log_every == 0:
        rows.append({'step': step, 'train_flops': flops, 'tokens': step * 4096,
                     'loss': loss['overall'], 'loss/text': loss['text'],
                     'loss/image': loss['image'], 'tokens_per_sec': 1e5,
                     'route/left_behind/text': 0.1})
      if eval_every and step % eval_every == 0:
        rows.append({'step': step, 'train_flops': flops, 'eval/loss': loss['overall'],
                     'eval/loss/text': loss['text'], 'eval/loss/image': loss['image'],
                     'eval/wikitext/loss': 3.0})
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return str(workdir)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(dense, sparse) run directories: different lengths and logging intervals."""
  root = tmp_path_factory.mktemp('runs')
  dense = write_run(root / 'dense', steps=1000, log_every=2, eval_every=50)
  sparse = write_run(root / 'moma_4t4i', speedup=SPEEDUP, flops_per_step=1.1e12,
                     steps=690, log_every=3, eval_every=69,
                     config=model_config('moma', mod=True))
  return dense, sparse


def compare(*args):
  """Runs moma-compare in-process; returns the exit code (0 when it returned)."""
  try:
    compare_cli.run(['moma-compare', *args])
  except SystemExit as e:
    return e.code
  return 0


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_writes_csv_markdown_and_figures(runs, tmp_path, capsys):
  dense, sparse = runs
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  assert compare('--baseline', dense, '--run', sparse, '--out', str(out)) == 0
  printed = capsys.readouterr()
  assert printed.err == ''
  assert sorted(os.listdir(out)) == ['eta_vs_flops.png', 'loss_vs_flops.png', 'notes.txt',
                                     'savings.csv', 'savings.md']
  assert (out / 'notes.txt').read_text() == 'mine'

  rows = read_csv(out / 'savings.csv')
  assert list(rows[0]) == ['run', 'modality', 'source', 'step', 'train_flops', 'loss', 'eta',
                           'extrapolated', 'bound']
  # Training points every 3 steps of 690 and eval points every 69, 3 modalities each.
  assert len(rows) == 3 * 230 + 3 * 10
  for modality, speedup in SPEEDUP.items():
    for source, count in (('train', 230), ('eval', 10)):
      mine = [r for r in rows if (r['modality'], r['source']) == (modality, source)]
      assert len(mine) == count and {r['run'] for r in mine} == {'moma_4t4i'}
      # Up to 2x the dense run's 1e15 FLOPs the law gives eta; beyond, the bound
      # 2e15 / C, which the true eta (the speedup) exceeds.
      exact = [r for r in mine if r['bound'] == 'False']
      np.testing.assert_allclose([float(r['eta']) for r in exact], speedup, rtol=0.02)
      for r in mine:
        if r['bound'] == 'True':
          assert float(r['eta']) == pytest.approx(2e15 / float(r['train_flops']))
          assert float(r['eta']) < speedup and r['extrapolated'] == 'True'
      assert (mine[-1]['bound'] == 'True') == (speedup * 690 * 1.1e12 > 2e15)
      extrapolated = [r['extrapolated'] == 'True' for r in mine]
      # The run ends below the dense run's lowest loss: its last points are extrapolated.
      assert extrapolated[-1] and not all(extrapolated), (modality, source)
      assert float(mine[-1]['train_flops']) == pytest.approx(690 * 1.1e12)

  table = (out / 'savings.md').read_text()
  assert printed.out.startswith(table)
  labels = [tuple(c.strip() for c in line.strip('|').split('|')[:3])
            for line in table.splitlines() if line.startswith('| moma_4t4i |')]
  # The headline is evaluation loss where both curves are measured.
  assert labels == [('moma_4t4i', 'eval', 'last measured'), ('moma_4t4i', 'eval', 'end'),
                    ('moma_4t4i', 'train (noisier)', 'last measured'),
                    ('moma_4t4i', 'train (noisier)', 'end')]
  for source in ('eval', 'train (noisier)'):
    line = next(l for l in table.splitlines()
                if l.startswith(f'| moma_4t4i | {source} | end |'))
    cells = [c.strip() for c in line.strip('|').split('|')]
    assert cells[3] == '7.59e+14'
    assert cells[4].endswith('*') and float(cells[4][:-1]) == pytest.approx(2.0, rel=0.02)
    assert cells[5] == cells[6] == f'> {2e15 / (690 * 1.1e12):.2f} (beyond the dense run)'
    # ... and where the run's points were last inside the dense range: measured.
    line = next(l for l in table.splitlines()
                if l.startswith(f'| moma_4t4i | {source} | last measured |'))
    cells = [c.strip() for c in line.strip('|').split('|')]
    etas = [float(c.split(' @ ')[0]) for c in cells[4:]]
    np.testing.assert_allclose(etas, [2.0, 4.0, 3.0], rtol=0.02)
  assert 'inf' not in table and 'nan' not in table
  assert ('| run | loss | point | train FLOPs | eta text | eta image | eta overall |'
          in table)
  assert re.search(r'^Values marked \* are extrapolated: .*power law', table, re.M)
  assert 'trusted up to 2x' in table
  assert f'Baseline: dense ({dense};' in table
  assert f'wrote {out}/savings.csv, {out}/savings.md' in printed.out

  for name in ('loss_vs_flops.png', 'eta_vs_flops.png'):
    assert (out / name).read_bytes()[:8] == PNG_MAGIC
    pixels = mpimg.imread(str(out / name))
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 900


def test_max_extrapolation_widens_what_the_law_gives(runs, tmp_path, capsys):
  dense, sparse = runs
  assert compare('--baseline', dense, '--run', sparse, '--out', str(tmp_path / 'o'),
                 '--max_extrapolation', '5') == 0
  rows = read_csv(tmp_path / 'o' / 'savings.csv')
  assert not any(r['bound'] == 'True' for r in rows)
  for modality, speedup in SPEEDUP.items():
    np.testing.assert_allclose([float(r['eta']) for r in rows if r['modality'] == modality],
                               speedup, rtol=0.02)
  assert 'trusted up to 5x' in capsys.readouterr().out
  assert compare('--baseline', dense, '--run', sparse, '--out', str(tmp_path / 'p'),
                 '--max_extrapolation', '0.5') == 2
  assert 'must be >= 1' in capsys.readouterr().err
  assert not (tmp_path / 'p').exists()


def test_eval_only_and_chosen_modalities(runs, tmp_path, capsys):
  dense, sparse = runs
  out = tmp_path / 'new' / 'out'           # created, parents too
  assert compare('--baseline', dense, '--run', sparse, '--run', sparse, '--out', str(out),
                 '--eval_only', '--modality', 'image', '--smooth', '0',
                 '--max_extrapolation', '5') == 0
  rows = read_csv(out / 'savings.csv')
  assert {(r['run'], r['modality'], r['source']) for r in rows} == {
      ('moma_4t4i', 'image', 'eval'), ('moma_4t4i#2', 'image', 'eval')}
  np.testing.assert_allclose([float(r['eta']) for r in rows], 4.0, rtol=1e-3)
  table = capsys.readouterr().out
  assert '| run | loss | point | train FLOPs | eta image |' in table
  assert '| moma_4t4i#2 | eval | end | 7.59e+14 | 4.00* |' in table


def test_runs_without_eval_rows_compare_training_losses(runs, tmp_path):
  dense, _ = runs
  sparse = write_run(tmp_path / 'sparse', speedup=SPEEDUP, steps=300, eval_every=0,
                     config=model_config('moma'))
  out = tmp_path / 'out'
  assert compare('--baseline', dense, '--run', sparse, '--out', str(out)) == 0
  assert {r['source'] for r in read_csv(out / 'savings.csv')} == {'train'}


def bad_inputs(root, dense, sparse):
  """(arguments, expected message) of each user error; writes the directories they need."""
  no_metrics = root / 'no_metrics'
  no_metrics.mkdir(exist_ok=True)
  (no_metrics / 'config.json').write_text(json.dumps(model_config('moma')))
  no_config = write_run(root / 'no_config', speedup=SPEEDUP, steps=10)
  os.remove(os.path.join(no_config, 'config.json'))
  no_rows = write_run(root / 'no_rows', rows=[{'step': 1, 'tokens': 5},
                                              {'step': 2, 'train_flops': 1e12, 'loss': None}])
  far = write_run(root / 'far', speedup={m: 1e6 for m in LAWS}, steps=100)
  moma = write_run(root / 'moma_base', steps=100, config=model_config('moma'))
  mod = write_run(root / 'mod_base', steps=100, config=model_config('dense', mod=True))
  no_eval = write_run(root / 'no_eval', speedup=SPEEDUP, steps=100, eval_every=0)
  out = ['--out', str(root / 'out')]
  return [
      (['--run', sparse, *out], '--baseline is required'),
      (['--baseline', dense, *out], '--run is required'),
      (['--baseline', dense, '--run', sparse], '--out is required'),
      (['--baseline', dense, '--run', str(root / 'nowhere'), *out], 'no such run directory'),
      (['--baseline', dense, '--run', str(no_metrics), *out], 'has no metrics.jsonl'),
      (['--baseline', dense, '--run', no_config, *out], 'is not a training run: no config.json'),
      (['--baseline', dense, '--run', no_rows, *out], 'has no usable rows'),
      (['--baseline', dense, '--run', far, *out], 'no overlapping loss range'),
      (['--baseline', moma, '--run', sparse, *out], "not a dense run (model.ffn is 'moma')"),
      (['--baseline', mod, '--run', sparse, *out], 'not a dense run (model.mod.enabled'),
      (['--baseline', dense, '--run', sparse, '--modality', 'audio', *out],
       "unknown modality 'audio'"),
      (['--baseline', dense, '--run', no_eval, '--eval_only', *out],
       f'--eval_only: {no_eval} has no evaluation rows'),
      (['--baseline', dense, '--run', sparse, '--smooth', '-1', *out], '--smooth must be >= 0'),
      (['--baseline', dense, '--run', sparse, '--smooth', 'wide', *out], "flag --smooth=wide"),
      (['--baseline', dense, '--run', sparse, '--runs', sparse, *out], "Unknown command line"),
      (['--baseline', dense, '--run', sparse, '--out', str(root / 'out' / 'keep.txt')],
       'exists and is not a folder'),
  ]


def test_user_errors_are_one_line_and_exit_2(runs, tmp_path, capsys):
  dense, sparse = runs
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'keep.txt').write_text('untouched')
  for args, expected in bad_inputs(tmp_path, dense, sparse):
    assert compare(*args) == 2, args
    printed = capsys.readouterr()
    lines = printed.err.splitlines()
    assert len(lines) == 1, printed.err
    assert lines[0].startswith('moma-compare: error: ') and expected in lines[0], lines[0]
    assert printed.out == ''
    assert os.listdir(tmp_path / 'out') == ['keep.txt'], args
    assert (tmp_path / 'out' / 'keep.txt').read_text() == 'untouched'


def test_subprocess_user_error(runs, tmp_path):
  dense, _ = runs
  result = subprocess.run(
      [sys.executable, '-m', 'moma_jax.cli.compare', '--baseline', dense, '--run',
       str(tmp_path / 'missing'), '--out', str(tmp_path / 'out')],
      cwd=ROOT, capture_output=True, text=True, timeout=60,
      env={**os.environ, 'MOMA_TRACEBACK': ''})
  assert result.returncode == 2, result
  assert result.stderr.splitlines() == [
      f'moma-compare: error: no such run directory: {tmp_path / "missing"}']
  assert result.stdout == '' and not (tmp_path / 'out').exists()


def test_help_exits_0(capsys):
  assert compare('--help') == 0
  printed = capsys.readouterr().out
  assert printed.startswith('moma-compare: FLOPs savings') and '--baseline' in printed
