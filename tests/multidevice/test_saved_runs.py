"""Saved runs opened on a mesh (8 CPU devices): `moma_jax.load(mesh=...)`, moma-eval and
moma-generate with `--config.mesh.fsdp=8`, and an upcycled start built on that mesh.

Run by tests/test_sharding.py in a process of its own with
XLA_FLAGS=--xla_force_host_platform_device_count=8. The module shares one tiny 1t1i run
(2 steps, jointly trained auxiliary routers so that it decodes causally, 8 routing
groups of one sequence so that fsdp=8 holds whole groups).
"""
import json

import jax
import numpy as np
import pytest
from orbax.checkpoint import type_handlers

import moma_jax
from moma_jax import configs
from moma_jax.cli import eval as eval_cli
from moma_jax.cli import generate as generate_cli
from moma_jax.runs import saved
from moma_jax.model import mesh as mesh_lib
from moma_jax.model import param_names
from moma_jax.model import sharding
from moma_jax.model import transformer
from moma_jax.training import optimizer as optimizer_lib
from moma_jax.runs import state as train_state
from moma_jax.training import trainer as train
from moma_jax.training import upcycle

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason='needs 8 devices')
FSDP = {'fsdp': 8}


@pytest.fixture(scope='module')
def source(data_setup, tmp_path_factory):
  """(config, workdir) of the 1t1i run, trained on the data=8 mesh."""
  from conftest import tiny_train_config
  c = tiny_train_config(data_setup[0].data.data_dir, steps=2, ckpt_every=1,
                        eval_every=100, eval_max_batches=1)
  c.model.experts = (1, 1)
  c.model.aux_router.enabled, c.model.aux_router.mode = True, 'joint'
  c.routing.group_size = 1
  workdir = str(tmp_path_factory.mktemp('saved_runs') / 'moma_1t1i')
  train.train(configs.validate(c), workdir)
  return c, workdir


def test_load_on_fsdp_reads_the_parameters_sharded_and_no_optimizer_state(source,
                                                                          monkeypatch):
  _, workdir = source
  read = []
  original = type_handlers.ArrayHandler.deserialize

  def deserialize(self, infos, args=None):
    read.extend(info.name for info in infos)
    return original(self, infos, args)
  monkeypatch.setattr(type_handlers.ArrayHandler, 'deserialize', deserialize)
  before = sum(a.nbytes for a in jax.live_arrays())
  run = moma_jax.load(workdir, mesh=saved.mesh_for(workdir, FSDP))
  leaves = jax.tree.leaves(run.params)
  assert sum(a.nbytes for a in jax.live_arrays()) - before == sum(a.nbytes for a in leaves)
  assert read and all(name.startswith('params.') for name in read), read[:5]
  assert run.mesh.shape['fsdp'] == 8 and not hasattr(run, 'opt')
  # Every matrix [.., D, ..] splits its embed axis (D 32): each device holds 1/8 of it.
  # (Small leaves without one, the QK-norm scale [K] or a threshold [R, E], stay whole.)
  matrices = 0
  for path, a in jax.tree_util.tree_flatten_with_path(run.params)[0]:
    assert a.sharding.mesh == run.mesh, jax.tree_util.keystr(path)
    if a.ndim >= 2 and run.config.model.d_model in a.shape:
      matrices += 1
      assert {s.data.size for s in a.addressable_shards} == {a.size // 8}, (
          jax.tree_util.keystr(path), a.sharding.spec)
  assert matrices >= 10


def _cli(capsys, fn, argv):
  fn(argv)
  return capsys.readouterr().out


def test_moma_eval_on_fsdp_gives_the_one_device_losses(source, capsys):
  _, workdir = source
  one = json.loads(_cli(capsys, eval_cli.run, ['moma-eval', f'--workdir={workdir}',
                                               '--json']))
  sharded = json.loads(_cli(capsys, eval_cli.run, ['moma-eval', f'--workdir={workdir}',
                                                   '--json', '--config.mesh.fsdp=8']))
  assert sharded.keys() == one.keys() and sharded['step'] == one['step'] == 2
  # Not bit-equal: fsdp splits the embed contractions and the batch sums over devices,
  # which add the same terms in another order (float32 rounding, ~1e-7 relative).
  np.testing.assert_allclose([sharded[k] for k in one], [one[k] for k in one], rtol=1e-5)


def test_moma_generate_on_fsdp_samples_the_one_device_tokens(source, capsys):
  _, workdir = source
  # Three prompts do not split over 8 devices: rows whole on every device.
  argv = ['moma-generate', f'--workdir={workdir}', '--prompt=a', '--prompt=the small',
          '--prompt=x', '--max_new_tokens=6', '--seed=3']
  one = _cli(capsys, generate_cli.run, argv)
  assert one.count('\n') == 3
  assert _cli(capsys, generate_cli.run, [*argv, '--config.mesh.fsdp=8']) == one


@pytest.mark.parametrize('optimizer', ['restart', 'carry'])
def test_upcycled_start_on_fsdp_equals_the_one_device_start(source, data_setup, optimizer):
  """Parameters and optimizer state; 'carry' reads the source's moments sharded too (from
  its step 1, whose schedule of 2 steps the new run's 1 step ends)."""
  from conftest import tiny_train_config
  at_step = 2 if optimizer == 'restart' else 1
  c = tiny_train_config(data_setup[0].data.data_dir, steps=source[0].train.steps - at_step
                        if optimizer == 'carry' else 2)
  c.routing.group_size = 1
  c.model.router_noise = 'gumbel'
  c.upcycle.from_workdir, c.upcycle.at_step, c.upcycle.optimizer = (source[1], at_step,
                                                                     optimizer)
  starts = []
  for devices, mesh in ((jax.devices()[:1], dict(data=1)), (jax.devices(), FSDP)):
    c.mesh.update({**{a: 1 for a in mesh_lib.AXES}, **mesh})
    config = configs.validate(c)
    mesh = sharding.make_mesh(config, devices)
    model, tx = transformer.build(config), optimizer_lib.optimizer(config)
    _, state_sh = train_state.layout(model, tx, mesh)
    upcycle.check_source(config)
    starts.append(upcycle.initial_state(config, tx, model, state_sh, mesh))
  (one, one_progress), (sharded, sharded_progress) = starts
  assert sharded_progress == one_progress
  fresh = 0
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(sharded)[0],
                          jax.tree.leaves(one)):
    where = jax.tree_util.keystr(path)
    assert a.sharding.mesh.shape['fsdp'] == 8, where
    if path[0].key == 'params' and param_names.role(path) in ('expert_router', 'aux_router'):
      # A fresh init, made by the program's sharded twin: XLA's CPU code for a [2, E]
      # shard may round the normal sampler's polynomial otherwise than for [16, E] (one
      # CPU gave 8 of 128 values 1 ulp apart). What is read or copied is exact.
      fresh += 1
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0,
                                 err_msg=where)
    else:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)
  assert fresh > 0
