"""Exact resume: a run killed at a random moment, or stopped by SIGTERM, continues as if
nothing happened; unusable checkpoints are set aside, never silently started over.

"The same run" means: every metrics row of the resumed run equals the uninterrupted
run's, in every key but the timings. The uninterrupted reference is the tiny quickstart
run shared by the whole test run (`trained_run`, 30 steps, checkpoints at 10/20/30,
evaluations at 15/30). Kill moments are drawn at random per test run; the seed is
printed (and named in failures), and `MOMA_KILL_SEED=N` replays it.
"""
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import tiny_train_config, train_usage_error
from moma_jax.runs import checkpoint as ckpt_lib
from moma_jax.training import metrics_log
from moma_jax.training import trainer as train

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
def is_timing(key: str) -> bool:
  """Keys that measure time (they differ between any two runs)."""
  return key == 'tokens_per_sec' or key.startswith('time/')

# The child: the trainer, untouched, with markers on stdout that say where it is.
# `@ save S` .. `@ save-done S` is the call that starts an asynchronous save (the commit
# follows in the background); `@ row S` .. `@ row-done S` is a metrics row; between the
# training row of an evaluation step and its evaluation row, the evaluation runs.
DRIVER = r"""
import json, sys
sys.path.insert(0, {tests!r})
from conftest import tiny_train_config
from moma_jax import configs
from moma_jax.runs import checkpoint
from moma_jax.training import metrics_log, trainer as train

data_dir, workdir, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

def marked(event, method):
  def wrapper(self, step, *args, **kwargs):
    print(f'@ {{event}} {{step}}', flush=True)
    out = method(self, step, *args, **kwargs)
    print(f'@ {{event}}-done {{step}}', flush=True)
    return out
  return wrapper

metrics_log.MetricsLog.write = marked('row', metrics_log.MetricsLog.write)
checkpoint.Checkpoints.save = marked('save', checkpoint.Checkpoints.save)
config = tiny_train_config(data_dir)
for dotted, value in overrides.items():
  *parents, leaf = dotted.split('.')
  target = config
  for p in parents:
    target = target[p]
  target[leaf] = tuple(value) if isinstance(value, list) else value
train.train(configs.validate(config), workdir,
            on_step=lambda step: print(f'@ step-done {{step}}', flush=True))
""".format(tests=os.path.dirname(os.path.abspath(__file__)))


def comparable(rows):
  return [{k: v for k, v in r.items() if not is_timing(k)} for r in rows]


def assert_same_run(workdir, reference_rows, context=''):
  got, want = comparable(metrics_log.read_rows(workdir)), comparable(reference_rows)
  assert [r['step'] for r in got] == [r['step'] for r in want], context
  for a, b in zip(got, want):
    assert a == b, (context, a['step'], {k: (a.get(k), b.get(k)) for k in set(a) | set(b)
                                         if a.get(k) != b.get(k)})


def assert_prefix_of(workdir, reference_rows, context=''):
  """The rows a killed run left are the reference's first rows (nothing wrong is kept)."""
  got = comparable(metrics_log.read_rows(workdir))
  assert got == comparable(reference_rows)[:len(got)], context


class Child:
  """One `train.train` in a subprocess, its markers read line by line."""

  def __init__(self, data_dir, workdir, overrides=None):
    self.proc = subprocess.Popen(
        [sys.executable, '-c', DRIVER, data_dir, workdir, json.dumps(overrides or {})],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    self.markers = []

  def wait_for(self, marker, nth=1, timeout=300):
    """Reads markers until `marker` has been seen `nth` times in all."""
    deadline = time.monotonic() + timeout
    while self.markers.count(marker) < nth:
      line = self.proc.stdout.readline()
      if not line:
        _, err = self.proc.communicate()
        raise AssertionError(f'child ended before {marker!r}: {err[-3000:]}')
      if line.startswith('@ '):
        self.markers.append(line[2:].strip())
      assert time.monotonic() < deadline, marker

  def signal(self, sig):
    self.proc.send_signal(sig)
    out, err = self.proc.communicate(timeout=300)
    self.markers += [line[2:].strip() for line in out.splitlines() if line.startswith('@ ')]
    return self.proc.returncode, err


def committed(workdir):
  return set(ckpt_lib.Checkpoints(workdir).all_steps())


def kill_seed():
  seed = int(os.environ.get('MOMA_KILL_SEED') or secrets.randbelow(2**31))
  print(f'kill moments drawn with seed {seed} (replay: MOMA_KILL_SEED={seed})')
  return seed, np.random.default_rng(seed)


# ----------------------------------------------------------------------------------
# SIGKILL at random moments, one run after another in the same workdir
# ----------------------------------------------------------------------------------
CHECKPOINTS, EVALUATIONS = (10, 20, 30), (15, 30)     # trained_run's steps


def test_random_sigkills_resume_exactly(trained_run, tmp_path):
  """SIGKILLs at random moments of five phases, one run after another in one workdir:
  just after a checkpoint was started, between a checkpoint and an evaluation, during
  an evaluation, during an asynchronous save, and at a random later time. A kill that
  missed its phase (it came too late) is followed by another with a shorter wait. After
  each kill the rows left are the reference's; the run finished after the last equals
  it row for row."""
  config, _, reference = trained_run
  seed, rng = kill_seed()
  workdir = str(tmp_path / 'run')
  newest = lambda: max(committed(workdir), default=0)
  next_of = lambda steps: min(s for s in steps if s > newest())

  def after_checkpoint():
    return f'save-done {next_of(CHECKPOINTS[:2])}', rng.uniform(0, 0.5), lambda after: True

  def between():
    start = max(newest(), 10)                        # a restart resumes after `start`
    end = next_of(EVALUATIONS)
    step = int(rng.integers(start + 1, end - 1))    # killed in step step+1 < end
    return (f'step-done {step}', rng.uniform(0, 0.05),
            lambda after: f'row {end}' not in after)

  def evaluation():
    step = next_of(EVALUATIONS)                      # between its two rows
    return f'row-done {step}', rng.uniform(0, 0.3), lambda after: f'row {step}' not in after

  def saving():
    step = next_of(CHECKPOINTS)
    return (f'save-done {step}', rng.uniform(0, 0.002),
            lambda after: step not in committed(workdir))

  def later():
    return (f'step-done {int(rng.integers(newest() + 1, 29))}', rng.uniform(0, 1.0),
            lambda after: True)

  for phase in (after_checkpoint, between, evaluation, saving, later):
    for attempt in range(4):
      marker, delay, landed = phase()
      context = f'seed {seed}, {phase.__name__}, attempt {attempt}'
      child = Child(config.data.data_dir, workdir)
      child.wait_for(marker)
      time.sleep(delay * 0.2**attempt)
      code, err = child.signal(signal.SIGKILL)
      assert code == -signal.SIGKILL, (context, err[-3000:])
      assert_prefix_of(workdir, reference, context)
      if landed(child.markers[child.markers.index(marker) + 1:]):
        break
    else:
      raise AssertionError(f'{context}: every kill missed its phase')
  train.train(config, workdir)
  assert_same_run(workdir, reference, f'seed {seed}')


def test_sigterm_at_a_random_moment_saves_exits_0_and_resumes_exactly(trained_run, tmp_path):
  config, _, reference = trained_run
  seed, rng = kill_seed()
  workdir = str(tmp_path / 'run')
  child = Child(config.data.data_dir, workdir)
  child.wait_for(f'step-done {int(rng.integers(11, 28))}')
  time.sleep(rng.uniform(0, 0.3))
  code, err = child.signal(signal.SIGTERM)
  assert code == 0, (seed, err[-3000:])
  last = max(int(m.split()[-1]) for m in child.markers if m.startswith('step-done'))
  assert f'SIGTERM at step {last}: checkpoint saved' in err, (seed, err[-2000:])
  assert max(committed(workdir)) == last, seed
  assert_prefix_of(workdir, reference, f'seed {seed}')
  train.train(config, workdir)
  assert_same_run(workdir, reference, f'seed {seed}')


def test_gradient_accumulation_resumes_exactly(data_setup, tmp_path):
  """train.grad_accum=2 (micro-batches of one routing group): killed at a random moment
  after its first checkpoint, the resumed run equals its uninterrupted one."""
  overrides = {'train.grad_accum': 2, 'routing.group_size': 4, 'train.steps': 14,
               'train.ckpt_every': 5, 'train.eval_every': 7}
  config = tiny_train_config(data_setup[0].data.data_dir, group_size=4, grad_accum=2,
                             steps=14, ckpt_every=5, eval_every=7)
  reference_dir = str(tmp_path / 'reference')
  train.train(config, reference_dir)
  reference = metrics_log.read_rows(reference_dir)
  seed, rng = kill_seed()
  workdir = str(tmp_path / 'run')
  child = Child(config.data.data_dir, workdir, overrides)
  child.wait_for(f'step-done {int(rng.integers(5, 12))}')
  time.sleep(rng.uniform(0, 0.3))
  assert child.signal(signal.SIGKILL)[0] == -signal.SIGKILL
  train.train(config, workdir)
  assert_same_run(workdir, reference, f'seed {seed}')


# ----------------------------------------------------------------------------------
# Unusable checkpoints: one warning line, the previous one, the same continuation
# ----------------------------------------------------------------------------------
def _truncate_arrays(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    for name in files:
      with open(os.path.join(root, name), 'r+b') as f:
        f.truncate(0)


def _remove_state_metadata(step_dir):
  os.remove(os.path.join(step_dir, 'state', '_METADATA'))


def _remove_progress_item(step_dir):
  shutil.rmtree(os.path.join(step_dir, 'progress'))


def _empty_the_directory(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


def _another_runs_config(step_dir):
  """The step's saved config says another model (a checkpoint copied from elsewhere)."""
  path = os.path.join(step_dir, 'config', 'metadata')
  with open(path) as f:
    saved = json.load(f)
  saved['model']['d_model'] *= 2
  with open(path, 'w') as f:
    json.dump(saved, f)


DAMAGE = [(_truncate_arrays, 'cannot be used'), (_remove_state_metadata, 'cannot be used'),
          (_remove_progress_item, 'cannot be used'),
          (_empty_the_directory, 'was not found in the checkpoint'),
          (_another_runs_config, 'written by a run with another model')]


@pytest.mark.parametrize('damage,expected', DAMAGE, ids=[d.__name__[1:] for d, _ in DAMAGE])
def test_unusable_newest_checkpoint_is_moved_aside(trained_run, tmp_path, capfd, damage,
                                                   expected):
  config, workdir, reference = trained_run
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  damage(os.path.join(copy, ckpt_lib.CHECKPOINT_DIR, '30'))
  capfd.readouterr()
  steps = []
  train.train(config, copy, on_step=steps.append)   # resumes from 20, trains 21..30 again
  err = capfd.readouterr().err
  warnings = [line for line in err.splitlines() if line.startswith('warning:')]
  assert len(warnings) == 1 and 'checkpoint step 30' in warnings[0], err
  assert expected in warnings[0], warnings
  assert 'Traceback' not in err
  assert steps == list(range(21, 31))
  assert os.listdir(os.path.join(copy, ckpt_lib.CORRUPT_DIR))[0].startswith('30.')
  assert sorted(committed(copy)) == [10, 20, 30]
  assert_same_run(copy, reference)


def test_no_usable_checkpoint_is_one_line_exit_2_and_nothing_moved(trained_run, tmp_path,
                                                                   capsys):
  from test_train import _tiny_flags, snapshot   # the CLI flags of the tiny run
  config, workdir, _ = trained_run
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  for step in (10, 20, 30):
    _truncate_arrays(os.path.join(copy, ckpt_lib.CHECKPOINT_DIR, str(step)))
  before = snapshot(copy)
  argv = ['moma-train', '--config=experiments/quickstart.py', f'--workdir={copy}',
          *_tiny_flags(config)]
  for _ in range(2):                      # a rerun says the same: it never starts over
    line = train_usage_error(argv, capsys)
    assert 'no usable checkpoint in' in line and 'step 30:' in line and 'step 10:' in line
    assert snapshot(copy) == before
