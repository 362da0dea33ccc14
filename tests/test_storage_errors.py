"""A write that fails for lack of space ends as one line, keeps the last checkpoint, and
the rerun resumes as if nothing happened: real failures, not mocks.

tests/storage_run.py is a tiny run at the level of Checkpoints and MetricsLog (the
trainer's own tests cover moma-train end to end). The failures: a full disk, a 6 MiB
tmpfs (needs root and mount; skipped where it cannot be mounted), and the file size
limit (RLIMIT_FSIZE: EFBIG), which needs neither and runs everywhere.
"""
import contextlib
import os
import subprocess
import sys
import uuid

import pytest

from moma_jax import run_dir
from moma_jax.runs import checkpoint as ckpt_lib
from moma_jax.training import metrics_log

SCRIPT = os.path.join(os.path.dirname(__file__), 'storage_run.py')
MIB = 1 << 20


def storage_run(workdir, steps, *args):
  """(exit code, stdout, stderr) of tests/storage_run.py."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  done = subprocess.run([sys.executable, SCRIPT, str(workdir), str(steps), *args],
                        capture_output=True, text=True, env=env, timeout=300)
  return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(the uninterrupted run's stdout, its workdir, a run stopped after step 20)."""
  root = tmp_path_factory.mktemp('storage')
  code, out, err = storage_run(root / 'reference', 30)
  assert code == 0, err
  code, _, err = storage_run(root / 'at20', 20)
  assert code == 0, err
  return out, root / 'reference', root / 'at20'


@contextlib.contextmanager
def tmpfs(path, size):
  """A file system of `size` at `path` (skips the test where none can be mounted)."""
  os.makedirs(path)
  try:
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs',
                              str(path)], capture_output=True)
  except FileNotFoundError:
    pytest.skip('no mount command here')
  if mounted.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {mounted.stderr.decode().strip()}')
  try:
    yield path
  finally:
    subprocess.run(['umount', str(path)], check=True)


def fill(folder, leave):
  """Writes a file into `folder` that leaves `leave` bytes free on its file system."""
  st = os.statvfs(folder)
  path = os.path.join(folder, f'filler-{uuid.uuid4().hex}')
  with open(path, 'wb') as f:
    f.write(b'\0' * (st.f_bavail * st.f_frsize - leave))
  return path


def assert_failed_then_resumed(runs, workdir, err, fix, failed_path):
  reference_out, reference, _ = runs
  assert err.count('\n') == 1, err                     # no traceback, no Orbax log
  assert err.startswith('storage-run: error: ') and f'writing {failed_path};' in err, err
  directory = os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)
  assert f'the last good checkpoint is step 20 in {directory};' in err, err
  # The failed step is a temporary folder or nothing, never a step (the rerun removes it).
  assert sorted(n for n in os.listdir(directory) if n.isdigit()) == ['10', '20']
  fix()
  code, out, err = storage_run(workdir, 30)
  assert (code, err) == (0, ''), err
  assert out == reference_out                          # the same state at step 30
  assert metrics_log.read_rows(str(workdir)) == metrics_log.read_rows(str(reference))
  assert sorted(os.listdir(directory)) == ['10', '20', '30']


def test_a_full_disk_at_a_checkpoint(runs, tmp_path):
  with tmpfs(tmp_path / 'fs', '6m') as fs:
    workdir = fs / 'run'
    subprocess.run(['cp', '-a', str(runs[2]), str(workdir)], check=True)
    # Room for the metrics rows, not for the ~2 MiB of step 30's checkpoint.
    filler = fill(fs, leave=MIB // 4)
    code, _, err = storage_run(workdir, 30)
    assert code == 2, err
    assert err.startswith('storage-run: error: no space left on device'), err
    assert 'free space and rerun the same command to resume' in err
    failed = os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR, '30')
    assert os.path.isdir(failed + '.orbax-checkpoint-tmp')
    assert_failed_then_resumed(runs, workdir, err, lambda: os.remove(filler), failed)


@pytest.mark.parametrize('what', ['checkpoint', 'metrics'])
def test_the_file_size_limit(runs, tmp_path, what):
  workdir = tmp_path / 'run'
  subprocess.run(['cp', '-a', str(runs[2]), str(workdir)], check=True)
  # Checkpoint arrays of 2 MiB pass 1 MiB; metrics.jsonl passes its size + 200 bytes
  # within a few rows, long before step 30's checkpoint.
  limit = (MIB if what == 'checkpoint' else
           os.path.getsize(workdir / metrics_log.METRICS_FILE) + 200)
  code, _, err = storage_run(workdir, 30, '--fsize_limit', str(limit))
  assert code == 2, err
  assert err.startswith('storage-run: error: file too large writing'), err
  assert 'raise the file size limit (ulimit -f)' in err
  failed = (os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR, '30') if what == 'checkpoint'
            else os.path.join(workdir, metrics_log.METRICS_FILE))
  assert_failed_then_resumed(runs, workdir, err, lambda: None, failed)


def test_storage_errno_reads_tensorstore_and_os_errors():
  tensorstore = ValueError(
      'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "/r/": '
      'Failed to write 510381 bytes to file 5: No space left on device '
      "[os_error_code='28']")
  assert run_dir.storage_errno(tensorstore) == 28
  assert run_dir.storage_errno(OSError(30, 'Read-only file system')) == 30
  try:
    try:
      raise OSError(122, 'Disk quota exceeded')
    except OSError as e:
      raise RuntimeError('saving failed') from e
  except RuntimeError as wrapped:
    assert run_dir.storage_errno(wrapped) == 122
  # Device memory is exhausted too, in the same words: not a storage failure.
  assert run_dir.storage_errno(ValueError('RESOURCE_EXHAUSTED: Out of memory')) is None
  assert run_dir.storage_errno(OSError(2, 'No such file or directory')) is None
