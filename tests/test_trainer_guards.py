"""moma-train against what happens outside it: a second trainer on the same workdir, and
a checkpoint that cannot be written. Either ends in one line, exit code 2, with nothing
already written damaged; the run then goes on as if nothing had happened.

The lock and the storage errors themselves are tested in tests/test_run_lock.py and
tests/test_storage_errors.py; here they meet the real trainer.
"""
import os
import shutil
import subprocess
import sys

from conftest import train_usage_error
from test_resume import Child, assert_same_run, committed
from test_train import _tiny_flags
from moma_jax.runs import checkpoint as ckpt_lib
from moma_jax.training import trainer as train

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def _argv(config, workdir):
  return ['moma-train', '--config=experiments/quickstart.py', f'--workdir={workdir}',
          *_tiny_flags(config)]


def test_a_second_trainer_on_a_held_workdir_exits_2_and_the_first_finishes_unchanged(
    trained_run, tmp_path, capsys):
  config, _, reference = trained_run
  workdir = str(tmp_path / 'run')
  first = Child(config.data.data_dir, workdir)
  first.wait_for('step-done 5')
  line = train_usage_error(_argv(config, workdir), capsys)
  assert f'{workdir} is in use by moma-train (pid {first.proc.pid}' in line, line
  _, err = first.proc.communicate(timeout=300)
  assert first.proc.returncode == 0, err[-3000:]
  assert_same_run(workdir, reference)
  assert not os.path.exists(os.path.join(workdir, '.lock'))      # released at the end


# moma-train under a file size limit: writes past it fail with EFBIG (SIGXFSZ, which
# would kill the process instead, is ignored). Set in the child itself, not in a
# preexec_fn: forking this multithreaded (JAX) process to run one is unsafe.
LIMITED_TRAIN = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
sys.argv = ['moma-train', *sys.argv[2:]]
runpy.run_module('moma_jax.cli.train', run_name='__main__')
"""


def test_a_checkpoint_that_cannot_be_written_ends_in_one_line_and_the_rerun_resumes(
    trained_run, tmp_path):
  """The run resumes from step 20 under a file size limit (256 KiB) that its metrics
  (under 200 KiB) fit but not the largest of its checkpoint's array files (2.2 MiB in
  at most four): the save of step 30 fails."""
  config, workdir, reference = trained_run
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  shutil.rmtree(os.path.join(copy, ckpt_lib.CHECKPOINT_DIR, '30'))
  # The compilation cache would write files of its own past the limit.
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_ENABLE_COMPILATION_CACHE='false')
  done = subprocess.run([sys.executable, '-c', LIMITED_TRAIN, str(256 << 10),
                         *_argv(config, copy)[1:]], cwd=ROOT, env=env, text=True,
                        capture_output=True, timeout=600)
  lines = [line for line in done.stderr.splitlines() if not line.startswith('step ')]
  assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
  assert lines[0].startswith('moma-train: error: file too large writing '), lines
  assert f'the last good checkpoint is step 20 in {copy}' in lines[0], lines
  assert sorted(committed(copy)) == [10, 20]
  train.train(config, copy)                  # space again: resumes from 20
  assert_same_run(copy, reference)
