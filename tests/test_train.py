"""The trainer: loss falls, metrics as design §6, stops, bad input, NaN (exact resume:
test_resume.py).

Most tests reuse one tiny quickstart run shared by the whole test run (`trained_run` in
conftest.py) as the uninterrupted reference; the rest run in-process for at most 30 tiny
steps.
"""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import tiny_train_config, train_usage_error
from moma_jax.analysis import flops
from moma_jax.cli import train as train_cli
from moma_jax import run_dir
from moma_jax.runs import checkpoint as ckpt_lib
from moma_jax.training import metrics_log
from moma_jax.training import step as train_step
from moma_jax.training import trainer as train

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
QUICKSTART = 'experiments/quickstart.py'
EXACT_KEYS = ('loss', 'loss/text', 'loss/image', 'train_flops', 'tokens')


def training_rows(rows):
  return [r for r in rows if 'loss' in r]


def eval_rows(rows):
  return [r for r in rows if 'eval/loss' in r]


def snapshot(directory):
  """{relative path: sha256} of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


# ----------------------------------------------------------------------------------
# One uninterrupted run
# ----------------------------------------------------------------------------------
def assert_loss_falls(rows):
  losses = [r['loss'] for r in training_rows(rows)]
  assert np.mean(losses[-10:]) < losses[0] - 1.0, losses


def test_loss_falls(trained_run):
  assert_loss_falls(trained_run[2])   # moma_4t4i


@pytest.mark.parametrize('variant', ['dense', 'moe_8x', 'mod_moma_4t4i'])
def test_loss_falls_for_every_quickstart_variant(data_setup, tmp_path, variant):
  config = tiny_train_config(data_setup[0].data.data_dir, variant, eval_every=1000,
                             ckpt_every=1000)
  train.train(config, str(tmp_path / 'run'))
  assert_loss_falls(metrics_log.read_rows(str(tmp_path / 'run')))


def test_reading_a_live_run_leaves_out_the_row_being_written(trained_run, tmp_path):
  """A reader polling a running trainer's metrics.jsonl can catch a row half written:
  the rows it reads are the complete lines, cut anywhere in the next one."""
  rows = trained_run[2]
  with open(os.path.join(trained_run[1], metrics_log.METRICS_FILE)) as f:
    text = f.read()
  lines = text.splitlines(keepends=True)
  cut = np.random.default_rng().integers(1, len(lines[2]))   # inside row 3, before '\n'
  with open(tmp_path / metrics_log.METRICS_FILE, 'w') as f:
    f.write(''.join(lines[:2]) + lines[2][:cut])
  assert metrics_log.read_rows(str(tmp_path)) == rows[:2]


def test_metrics_rows_follow_the_design(trained_run):
  config, workdir, rows = trained_run
  train_rows = training_rows(rows)
  assert [r['step'] for r in train_rows] == list(range(1, 31))   # one row per step
  report = flops.count(config)
  for row in train_rows:
    for key in ('train_flops', 'tokens', 'loss', 'loss/text', 'tokens_per_sec',
                'nonfinite_skipped', 'route/left_behind/text', 'route/grad_norm/text',
                'route/tokens_per_expert/0', 'batch_tokens/text', 'batch_tokens/image',
                'time/step', 'time/data_wait', 'time/eval', 'time/checkpoint'):
      assert key in row, key
    # A modality without targets in the step's batch has no loss (rather than 0).
    assert ('loss/image' in row) == (row['batch_tokens/image'] > 0), row
    assert all(isinstance(v, (int, float)) for v in row.values()), row
  assert sum('loss/image' in r for r in train_rows) >= 20
  # Where the time went since the previous row: evaluation (after steps 15, 30) and
  # saving (after 10, 20) are booked to the next row, never to training time.
  by_step = {r['step']: r for r in train_rows}
  assert all(r['time/step'] > 0 and 0 <= r['time/data_wait'] for r in train_rows)
  assert by_step[16]['time/eval'] > 0 and by_step[11]['time/checkpoint'] > 0
  assert by_step[14]['time/eval'] == 0 == by_step[14]['time/checkpoint']
  # train_flops: per-modality training FLOPs per token x that modality's target tokens,
  # summed over steps; with equal per-token costs here it is tokens x the cost.
  assert report.train['text'] == report.train['image']
  np.testing.assert_allclose(train_rows[-1]['train_flops'],
                             train_rows[-1]['tokens'] * report.train['text'], rtol=1e-12)
  assert np.all(np.diff([r['tokens'] for r in train_rows]) > 0)
  evals = eval_rows(rows)
  assert [r['step'] for r in evals] == [15, 30]
  for key in ('eval/loss', 'eval/loss/text', 'eval/loss/image', 'eval/moma_shapes/loss',
              'eval/moma_digits/loss', 'eval/moma_pydoc/loss', 'train_flops'):
    assert key in evals[-1], key
  assert evals[-1]['eval/loss'] < evals[0]['eval/loss']
  assert sorted(os.listdir(os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR))) == ['10', '20', '30']
  assert os.path.exists(os.path.join(workdir, run_dir.CONFIG_FILE))
  assert any(n.startswith('events') for n in os.listdir(
      os.path.join(workdir, metrics_log.TENSORBOARD_DIR)))


# ----------------------------------------------------------------------------------
# Bad input: one line, exit code 2, an existing workdir left byte-identical
# ----------------------------------------------------------------------------------
BAD = [
    (['--config.train.bogus=1'], "no such config field 'bogus'"),
    (['--config.train.steps=many'], 'invalid literal'),
    (['--config.model.num_heads=3'], 'model.num_heads: 3 heads do not divide'),
    (["--config.model.capacity=(1.5,)"], 'model.capacity: must be in (0, 1]'),
    (['--config.data.name=no_such_dataset'], 'no_such_dataset'),
    (['--config.data.seq_len=512'], 'data.seq_len: 512 exceeds model.max_len'),
    (['--config.train.batch_size=12'], 'train.batch_size: 12 is not a multiple'),
    (['--config.train.schedule=step'], "train.schedule: must be 'linear' or 'cosine'"),
    (['--config.train.grad_accum=4'], 'train.grad_accum'),
    (['--config.model.d_model=64'], 'holds a run with another model'),
    (['--config.train.max_nonfinite=0'], 'train.max_nonfinite: must be a positive integer'),
]


def _tiny_flags(config):
  t = config.train
  return [f'--config.data.data_dir={config.data.data_dir}', '--config.data.vq.fit_images=600',
          '--config.model.d_model=32', '--config.model.num_layers=2',
          '--config.model.ffn_dim=128', '--config.model.max_len=64',
          '--config.data.seq_len=64', '--config.train.batch_size=8',
          f'--config.train.steps={t.steps}', f'--config.train.log_every={t.log_every}',
          f'--config.train.eval_every={t.eval_every}',
          f'--config.train.ckpt_every={t.ckpt_every}',
          f'--config.train.eval_max_batches={t.eval_max_batches}']


@pytest.mark.parametrize('extra,expected', BAD)
def test_bad_config_exits_2_and_leaves_workdir(trained_run, tmp_path, capsys, extra, expected):
  config, workdir, _ = trained_run
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  before = snapshot(copy)
  argv = ['moma-train', f'--config={QUICKSTART}', f'--workdir={copy}',
          *_tiny_flags(config), *extra]
  assert expected in train_usage_error(argv, capsys)
  assert snapshot(copy) == before


def test_workdir_that_is_a_file_and_unknown_variant(trained_run, tmp_path, capsys):
  config = trained_run[0]
  path = tmp_path / 'a_file'
  path.write_text('keep me')
  for conf, workdir, expected in [
      (QUICKSTART, str(path), 'is a file, not a directory'),
      (f'{QUICKSTART}:moma_9x', str(tmp_path / 'new'), "unknown quickstart variant 'moma_9x'")]:
    argv = ['moma-train', f'--config={conf}', f'--workdir={workdir}', *_tiny_flags(config)]
    assert expected in train_usage_error(argv, capsys)
  assert path.read_text() == 'keep me'
  assert not (tmp_path / 'new').exists()


def test_cli_subprocess_bad_config(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'moma_jax.cli.train', f'--config={QUICKSTART}',
       f'--workdir={tmp_path / "run"}', '--config.model.d_model=0'],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'MOMA_TRACEBACK': ''})
  assert result.returncode == 2, result.stderr
  assert result.stderr.splitlines() == [
      'moma-train: error: model.d_model: must be a positive integer, got 0']
  assert not (tmp_path / 'run').exists()


def test_sigterm_in_a_subprocess_saves_and_exits_0(trained_run, tmp_path):
  config = trained_run[0]
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, '-m', 'moma_jax.cli.train', f'--config={QUICKSTART}',
         f'--workdir={workdir}', *_tiny_flags(config), '--config.train.steps=10000',
         '--config.train.eval_every=10000']
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    deadline = time.monotonic() + 120
    while not any(r['step'] >= 3 for r in metrics_log.read_rows(workdir)):
      assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err
  last = training_rows(metrics_log.read_rows(workdir))[-1]['step']
  assert f'SIGTERM at step {last}: checkpoint saved' in err
  assert ckpt_lib.Checkpoints(workdir).latest_step() == last
  # Restarting continues from that step.
  longer = tiny_train_config(config.data.data_dir, steps=last + 2, eval_every=10000)
  assert train.train(longer, workdir)['step'] == last + 2
  assert [r['step'] for r in training_rows(metrics_log.read_rows(workdir))] == list(
      range(1, last + 3))


# ----------------------------------------------------------------------------------
# Non-finite losses
# ----------------------------------------------------------------------------------
def test_nan_is_skipped_and_counted(data_setup, tmp_path, nan_at_steps):
  config = tiny_train_config(data_setup[0].data.data_dir, steps=6, eval_every=100,
                             ckpt_every=100)
  nan_at_steps(config, [3])
  progress = train.train(config, str(tmp_path / 'run'))
  assert progress['nonfinite_skipped'] == 1 and progress['step'] == 6
  rows = training_rows(metrics_log.read_rows(str(tmp_path / 'run')))
  assert rows[2]['loss'] is None and rows[2]['nonfinite_skipped'] == 1
  assert rows[1]['nonfinite_skipped'] == 0 and all(np.isfinite(r['loss']) for r in rows[3:])


def test_persistent_nan_stops_with_exit_1(data_setup, tmp_path, capsys, nan_at_steps):
  config = tiny_train_config(data_setup[0].data.data_dir)
  nan_at_steps(config, [2, 3, 4, 5])
  argv = ['moma-train', f'--config={QUICKSTART}', f'--workdir={tmp_path / "run"}',
          *_tiny_flags(config), '--config.train.steps=8', '--config.train.max_nonfinite=3']
  with pytest.raises(SystemExit) as exit_info:
    train_cli.run(argv)
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.splitlines()[-1]
  assert err.startswith('moma-train: error: 3 non-finite') and 'at step 4' in err, err


# ----------------------------------------------------------------------------------
# Reading a run back: moma_jax.load, moma-eval, the profiler trace
# ----------------------------------------------------------------------------------
def test_load_returns_the_checkpointed_parameters(trained_run):
  import jax
  import moma_jax
  from moma_jax.model import transformer
  config, workdir, rows = trained_run
  run = moma_jax.load(workdir)
  assert run.step == 30 and run.config.to_dict() == config.to_dict()
  assert run.progress['train_flops'] == training_rows(rows)[-1]['train_flops']
  earlier = moma_jax.load(workdir, step=20)
  assert earlier.step == 20
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(run.params),
                                                      jax.tree.leaves(earlier.params)))
  batch = transformer.dummy_batch(run.config)
  logits = run.model.apply({'params': run.params}, batch['tokens'], batch['modality'],
                           batch['segment_ids'], batch['positions'])
  assert logits.shape == (*batch['tokens'].shape, config.model.vocab_size)


def test_load_errors_name_the_problem(trained_run, tmp_path):
  import moma_jax
  for workdir, step, expected in [(str(tmp_path / 'nope'), None, 'no such run directory'),
                                  (str(tmp_path), None, 'no config.json'),
                                  (trained_run[1], 7, 'has no checkpoint of step 7')]:
    with pytest.raises(run_dir.RunDirError, match=expected):
      moma_jax.load(workdir, step)


def test_moma_eval_reproduces_the_last_evaluation(trained_run, capsys):
  import json
  from moma_jax.cli import eval as eval_cli
  _, workdir, rows = trained_run
  before = snapshot(workdir)
  eval_cli.run(['moma-eval', f'--workdir={workdir}', '--json'])
  got = json.loads(capsys.readouterr().out)
  want = eval_rows(rows)[-1]
  assert got['step'] == want['step'] == 30
  assert got.keys() == want.keys()
  np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-6)
  eval_cli.run(['moma-eval', f'--workdir={workdir}'])
  table = capsys.readouterr().out
  assert 'moma_pydoc' in table and f"{want['eval/loss']:.4f}" in table
  # The diagnostic adds each split read alone, under its own prefix.
  eval_cli.run(['moma-eval', f'--workdir={workdir}', '--per_split', '--json'])
  split = json.loads(capsys.readouterr().out)
  assert {k: split[k] for k in want} == got
  assert {f'eval_split/{n}/loss' for n in ('moma_shapes', 'moma_digits', 'moma_pydoc')} \
      <= set(split) - set(want)
  assert snapshot(workdir) == before   # reading a run writes nothing


def test_profile_steps_write_a_trace(data_setup, tmp_path):
  config = tiny_train_config(data_setup[0].data.data_dir, steps=4, eval_every=1000,
                             ckpt_every=1000)
  train.train(config, str(tmp_path / 'run'), profile_steps=2)
  traces = [f for _, _, files in os.walk(tmp_path / 'run' / train.PROFILE_DIR)
            for f in files if f.endswith('.xplane.pb')]
  assert traces


def test_gradient_accumulation_equals_one_big_batch(data_setup):
  """Micro-batches of whole routing groups: the same routing, so 2 accumulated
  micro-batches give the loss, token counts and update of the full batch."""
  import jax
  from moma_jax.data import pipeline
  from moma_jax.model import transformer
  from moma_jax.training import optimizer as optimizer_lib
  base, tok = data_setup
  results = []
  for accum in (1, 2):
    config = tiny_train_config(base.data.data_dir, group_size=2, grad_accum=accum)
    model, tx = transformer.build(config), optimizer_lib.optimizer(config)
    params, _ = transformer.init(model, jax.random.key(0))
    batch = next(pipeline.train_iterator(config, tok, 0, 1))
    step = train_step.make_train_step(model, tx, config)
    state, metrics = step({'params': params, 'opt': tx.init(params)},
                          {k: jax.numpy.asarray(v) for k, v in batch.items()},
                          jax.numpy.int32(1))
    results.append((state['params'], metrics))
  (p1, m1), (p2, m2) = results
  for key in ('tokens', 'tokens/text', 'tokens/image'):
    assert int(m1[key]) == int(m2[key])
  for key in ('loss', 'loss/text', 'loss/image', 'grad_norm'):
    np.testing.assert_allclose(m1[key], m2[key], rtol=2e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
