"""One writer per workdir (moma_jax/run_lock.py), held by other processes for real."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from moma_jax import run_dir
from moma_jax import run_lock

# Holds the lock of argv[1] until its stdin closes (or it is killed).
HOLDER = textwrap.dedent('''
    import sys
    from moma_jax import run_lock
    lock = run_lock.hold(sys.argv[1], 'moma-train')
    print('held', flush=True)
    sys.stdin.read()
    lock.release()
''')


@pytest.fixture
def holder(tmp_path):
  """(workdir, process): another process holding tmp_path/run until its stdin closes."""
  workdir = str(tmp_path / 'run')
  proc = subprocess.Popen([sys.executable, '-c', HOLDER, workdir], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline() == 'held\n'
  yield workdir, proc
  if proc.poll() is None:
    proc.kill()
  proc.wait()


def test_a_second_holder_is_refused_naming_the_first(holder, capsys):
  workdir, proc = holder
  with pytest.raises(run_lock.WorkdirBusyError) as busy:
    run_lock.hold(workdir, 'moma-aux')
  message = str(busy.value)
  assert '\n' not in message
  for part in (workdir, 'moma-train', f'pid {proc.pid}', f'on {socket.gethostname()}',
               'since '):
    assert part in message, message
  assert isinstance(busy.value, run_dir.usage.UsageError)   # one line, exit code 2
  assert run_lock.read_holder(workdir)['pid'] == proc.pid    # the attempt changed nothing
  # Its holder ends: the lock file goes with it, and the workdir is free, no warning.
  proc.stdin.close()
  assert proc.wait() == 0
  assert not os.path.exists(os.path.join(workdir, run_lock.LOCK_FILE))
  with run_lock.hold(workdir, 'moma-aux') as lock:
    assert lock.held and run_lock.read_holder(workdir)['pid'] == os.getpid()
  assert capsys.readouterr().err == ''


def test_the_lock_of_a_killed_holder_is_taken_over_with_one_warning(holder, capsys):
  workdir, proc = holder
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert run_lock.read_holder(workdir)['pid'] == proc.pid     # its file is left behind
  with run_lock.hold(workdir, 'moma-train'):
    pass
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('warning: '), err
  assert f'pid {proc.pid}' in err and 'moma-train' in err and 'gone' in err
  assert os.listdir(workdir) == []


def test_a_stale_lock_file_is_taken_over_and_nothing_else_touched(tmp_path, capsys):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'metrics.jsonl').write_text('{"step": 1}\n')
  gone = subprocess.Popen([sys.executable, '-c', 'pass'])
  gone.wait()      # a pid that no longer exists; no OS lock on the file
  (workdir / run_lock.LOCK_FILE).write_text(json.dumps(dict(
      host=socket.gethostname(), pid=gone.pid, program='moma-train',
      since='2025-01-01 00:00:00 UTC')))
  with run_lock.hold(str(workdir), 'moma-train') as lock:
    assert lock.info['pid'] == os.getpid()
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and f'pid {gone.pid}' in err, err
  assert sorted(os.listdir(workdir)) == ['metrics.jsonl']
  assert (workdir / 'metrics.jsonl').read_text() == '{"step": 1}\n'


def test_this_process_cannot_hold_a_workdir_twice(tmp_path):
  # POSIX locks belong to the process: only the module's own table can refuse this,
  # and the refusal must not drop the lock held (closing any descriptor of it would).
  workdir = str(tmp_path / 'run')
  with run_lock.hold(workdir, 'moma-train'):
    with pytest.raises(run_lock.WorkdirBusyError, match=f'pid {os.getpid()}'):
      run_lock.hold(workdir, 'moma-aux')
    other = subprocess.run(
        [sys.executable, '-c', 'import sys; from moma_jax import run_lock\n'
         'try:\n  run_lock.hold(sys.argv[1], "x")\nexcept run_lock.WorkdirBusyError:\n'
         '  sys.exit(3)', workdir])
    assert other.returncode == 3
  assert not os.path.exists(workdir)      # hold made it; release removes it, empty


def test_a_disabled_hold_takes_nothing(tmp_path):
  with run_lock.hold(str(tmp_path), 'moma-train', enabled=False) as lock:
    assert not lock.held and os.listdir(tmp_path) == []


def test_moma_aux_on_a_held_workdir_exits_2_in_one_line(holder, capsys):
  from conftest import tiny_train_config
  from moma_jax.cli import aux as aux_cli    # imported late: it defines absl flags
  workdir, proc = holder
  run_dir.write_json(os.path.join(workdir, run_dir.CONFIG_FILE),
                     tiny_train_config(workdir).to_dict())
  for held_by, pid in (('another process', proc.pid), ('this process', os.getpid())):
    with pytest.raises(SystemExit) as exit_info:
      if held_by == 'this process':
        proc.stdin.close()
        proc.wait()
        with run_lock.hold(workdir, 'moma-train'):
          aux_cli.run(['moma-aux', '--workdir', workdir])
      else:
        aux_cli.run(['moma-aux', '--workdir', workdir])
    assert exit_info.value.code == 2, held_by
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('moma-aux: error: '), err
    assert f'in use by moma-train (pid {pid} ' in err, err
  assert sorted(os.listdir(workdir)) == [run_dir.CONFIG_FILE]    # nothing written
