"""Sharding: the mesh from the config, and sharded runs equal to one-device runs.

The 8-device tests (tests/multidevice) run here in a process of their own, with 8 fake
CPU devices; the two-process test starts real processes that talk through gloo.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from moma_jax import configs
from moma_jax.model import sharding
from moma_jax.runs import checkpoint as ckpt_lib
from moma_jax.training import metrics_log

from conftest import tiny_train_config
from test_resume import kill_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_shape_resolves_the_free_axis_and_refuses_bad_products():
  c = configs.default_config()
  c.mesh.update(dict(data=-1, fsdp=2, expert=1, tensor=2))
  assert sharding.mesh_shape(c, 16) == dict(data=4, fsdp=2, expert=1, tensor=2)
  with pytest.raises(configs.ConfigError, match='do not divide the 6 devices'):
    sharding.mesh_shape(c, 6)
  c.mesh.update(dict(data=-1, fsdp=-1))
  with pytest.raises(configs.ConfigError, match='at most one axis may be -1'):
    sharding.mesh_shape(c, 16)
  c.mesh.update(dict(data=0, fsdp=1))
  with pytest.raises(configs.ConfigError, match='mesh.data: must be a positive integer'):
    sharding.mesh_shape(c, 16)


@pytest.mark.slow
def test_on_eight_devices():
  """tests/multidevice: sharded steps equal one-device steps, placement, all-to-all,
  a checkpoint moving between meshes, bad meshes."""
  env = dict(os.environ, MOMA_MULTIDEVICE='1', JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:xdist', '-p', 'no:cacheprovider',
       'tests/multidevice'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ''
  assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
  assert ' passed' in summary and 'skipped' not in summary, summary


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_log_the_losses_of_one(data_setup, tmp_path):
  """Two real processes (one CPU device each, gloo), killed once and resumed, train 10
  quickstart steps on the data=2 mesh and log the losses one process (two devices) logs
  with the same global batch."""
  config = tiny_train_config(data_setup[0].data.data_dir, steps=10, eval_every=10,
                             ckpt_every=5, eval_max_batches=1)
  config.routing.group_size = 4                     # 2 routing groups: one per process
  overrides = [f'--config.{k}={v}' for k, v in (
      ('data.data_dir', config.data.data_dir), ('data.vq.fit_images', 600),
      ('model.d_model', 32), ('model.num_layers', 2), ('model.ffn_dim', 128),
      ('model.max_len', 64), ('data.seq_len', 64), ('train.batch_size', 8),
      ('train.steps', 10), ('train.log_every', 1), ('train.eval_every', 10),
      ('train.ckpt_every', 5), ('train.eval_max_batches', 1), ('train.warmup', 5),
      ('train.lr', 3e-3), ('routing.group_size', 4))]
  base = [sys.executable, '-m', 'moma_jax.cli.train', '--config',
          'experiments/quickstart.py:moma_4t4i', *overrides]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  # The one process has two devices, so that both runs sum gradients over two shards in
  # the same order: with one device a rounding difference in the 7th digit can tip a
  # near-tie in expert choice, and from there the losses differ by more than rounding.
  one = subprocess.run([*base, f'--workdir={tmp_path / "one"}'], cwd=ROOT,
                       env=dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=2'),
                       capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]

  def two_processes():
    port = _free_port()
    return [subprocess.Popen(
        [*base, f'--workdir={tmp_path / "two"}', f'--coordinator_address=127.0.0.1:{port}',
         '--num_processes=2', f'--process_id={i}'], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  # Both processes are SIGKILLed at a random step after the first checkpoint (step 5);
  # restarted, they resume from it and the run logs what the uninterrupted one did.
  seed, rng = kill_seed()
  kill_after = int(rng.integers(6, 10))
  procs = two_processes()
  deadline = time.monotonic() + 600
  first = tmp_path / 'two' / ckpt_lib.CHECKPOINT_DIR / '5'
  while not (first.is_dir() and any(r['step'] >= kill_after
                                    for r in metrics_log.read_rows(tmp_path / 'two'))):
    assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, (
        seed, [p.communicate()[1][-2000:] for p in procs])
    time.sleep(0.05)
  for p in procs:
    p.kill()
    p.communicate()
  assert 5 in ckpt_lib.Checkpoints(str(tmp_path / 'two')).all_steps(), seed
  procs = two_processes()
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert '2 process(es); mesh data=2' in outs[0][0], outs[0][0]
  assert '(resuming from step 5)' in outs[0][0], (seed, outs[0][0])

  def rows(name):
    with open(tmp_path / name / 'metrics.jsonl') as f:
      return [json.loads(line) for line in f]
  got, want = rows('two'), rows('one')
  assert [r['step'] for r in got] == [r['step'] for r in want]
  for a, b in zip(got, want):
    for key in ('loss', 'loss/text', 'loss/image', 'eval/loss'):
      if key in b:
        assert a[key] == b[key], (key, a['step'], a[key], b[key])   # bit-identical
    assert a.get('tokens') == b.get('tokens')
