"""The main job in miniature: a dense and a MoMa run, then moma-compare's table.

Its headline is eta from evaluation losses where both curves are measured, from at
least 12 evaluations per run, and no cell of the table is unbounded.
"""
import csv
import importlib.util
import math
import os
import re

import pytest

from conftest import tiny_train_config
from moma_jax.cli import compare as compare_cli
from moma_jax.training import metrics_log
from moma_jax.training import trainer as train

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
# A table cell: a value (* extrapolated; @ the FLOPs of the last measured point), a
# bound, or nothing.
CELL = re.compile(r'^(?:\d+\.\d\d\*?(?: @ \S+)?|> \d+\.\d\d \(beyond the dense run\)|-)$')


def quickstart():
  spec = importlib.util.spec_from_file_location(
      'quickstart', os.path.join(ROOT, 'experiments', 'quickstart.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('variant', quickstart().VARIANTS)
def test_quickstart_evaluates_at_least_12_times(variant):
  t = quickstart().get_config(variant).train
  assert t.steps // t.eval_every >= 12


@pytest.mark.slow
def test_tiny_main_job_leads_with_measured_eval_eta_and_nothing_unbounded(
    data_setup, tmp_path, capsys):
  root = tmp_path / 'quickstart'
  for variant in ('dense', 'moma_4t4i'):
    config = tiny_train_config(data_setup[0].data.data_dir, variant, steps=24,
                               eval_every=2, ckpt_every=100, log_every=2,
                               eval_max_batches=1)
    train.train(config, str(root / variant))
  capsys.readouterr()
  try:
    compare_cli.run(['moma-compare', '--baseline', str(root / 'dense'), '--run',
                     str(root / 'moma_4t4i'), '--out', str(root / 'savings')])
  except SystemExit as e:
    assert e.code in (0, None), capsys.readouterr().err
  table = capsys.readouterr().out
  with open(root / 'savings' / 'savings.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  evals = {r['step'] for r in rows if r['source'] == 'eval' and r['modality'] == 'overall'}
  assert len(evals) >= 12
  # Every eta is finite, and none claims the dense run would need more than 2x its own
  # training FLOPs (the default limit of extrapolation).
  dense_end = max(r['train_flops'] for r in metrics_log.read_rows(str(root / 'dense')))
  for r in rows:
    assert math.isfinite(float(r['eta'])), r
    assert float(r['eta']) * float(r['train_flops']) <= 2 * dense_end * (1 + 1e-9), r
  lines = [l for l in table.splitlines() if l.startswith('| moma_4t4i |')]
  assert lines[0].startswith('| moma_4t4i | eval | last measured |'), table
  for line in lines:
    for cell in [c.strip() for c in line.strip('|').split('|')][4:]:
      match = CELL.match(cell)
      assert match, (cell, table)
