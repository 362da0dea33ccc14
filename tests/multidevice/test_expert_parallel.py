"""Sharded and expert-parallel training equals single-device training (8 CPU devices).

Run by tests/test_sharding.py in a process of its own with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the device count is fixed when JAX
starts, and the rest of the suite runs on one device).
"""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moma_jax.cli import train as train_cli
from moma_jax import configs
from moma_jax.model import names
from moma_jax.model import sharding
from moma_jax.model import transformer
from moma_jax.training import optimizer as optimizer_lib
from moma_jax.runs import state as train_state
from moma_jax.training import step as train_step
from moma_jax.training import trainer as train

MESHES = {
    'data=8': dict(data=8, fsdp=1, expert=1, tensor=1),
    'data=2 x expert=4': dict(data=2, fsdp=1, expert=4, tensor=1),
    'fsdp=2 x expert=2 x tensor=2': dict(data=1, fsdp=2, expert=2, tensor=2),
}
MODELS = {
    'mod_moma_4t4i': dict(ffn='moma', experts=(4, 4), mod=True),
    'moe_8x': dict(ffn='moe', experts=(8,), mod=False),
    'mod_topk_8x': dict(ffn='topk', experts=(8,), mod=True),   # token choice: one mesh
}
STEPS = 5
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason='needs 8 devices')


def model_config(name, mesh=None):
  """d 32, 4 heads, 2 layers, seq 16, 16 sequences in 8 routing groups of 2."""
  spec = MODELS[name]
  c = configs.default_config()
  m = c.model
  m.d_model, m.num_heads, m.num_layers, m.ffn_dim = 32, 4, 2, 64
  m.vocab_size, m.max_len = 64, 16
  m.ffn, m.experts = spec['ffn'], spec['experts']
  m.mod.enabled = spec['mod']
  c.data.seq_len = 16
  c.routing.group_size = 2
  c.train.batch_size = 16
  c.train.lr, c.train.warmup = 3e-3, 1
  c.mesh.update(mesh or dict(data=1, fsdp=1, expert=1, tensor=1))
  return configs.validate(c)


def batches(config, count):
  """Random mixed-modal batches: image blocks inside text, some padding."""
  rng = np.random.default_rng(0)
  b, l = config.train.batch_size, config.data.seq_len
  out = []
  for _ in range(count):
    modality = np.zeros((b, l), np.int8)
    for row in range(b):
      start = rng.integers(0, l - 4)
      modality[row, start:start + rng.integers(2, l - start)] = 1
    segment = np.ones((b, l), np.int32)
    segment[rng.random((b,)) < 0.25, -3:] = 0
    out.append(dict(tokens=rng.integers(0, 64, (b, l)).astype(np.int32),
                    modality=modality, segment_ids=segment,
                    positions=np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy(),
                    loss_mask=(segment > 0).astype(np.int32)))
  return out


def run(name, mesh_shape, ep_buffer_factor=None, kernels='xla'):
  """Step-1 loss, gradients and metrics, the routing selections and statistics of a
  forward pass at the initial parameters, then STEPS training losses.

  The gradients are read from the optimizer state after step 1 rather than from a
  second program: Adam's first moment starts at zero, so after one update it holds
  (1 - b1) times the (clipped) gradients, exactly."""
  config = model_config(name, mesh_shape)
  config.routing.ep_buffer_factor = ep_buffer_factor
  config.model.kernels = kernels
  devices = jax.devices() if mesh_shape else jax.devices()[:1]
  if not mesh_shape:
    config.mesh.update(dict(data=1, fsdp=1, expert=1, tensor=1))
  mesh = sharding.make_mesh(config, devices)
  model = transformer.build(config)
  tx = optimizer_lib.optimizer(config)
  _, state_sh = train_state.layout(model, tx, mesh)
  state = train_state.create(model, tx, state_sh, seed=0)
  batch_sh = sharding.batch_sharding(mesh)
  data = batches(config, STEPS)
  with jax.set_mesh(mesh), sharding.axis_rules():
    put = lambda b: sharding.global_batch(b, batch_sh)

    def analysis(params, batch):
      _, sown = model.apply({'params': params}, batch['tokens'], batch['modality'],
                            batch['segment_ids'], batch['positions'],
                            mutable=list(names.ANALYSIS))
      return sown['intermediates']
    inter = jax.jit(analysis)(state['params'], put(data[0]))
    step = train_step.make_train_step(model, tx, config, (state_sh, batch_sh))
    # Compiled once, ahead of time: the program that trains is the one whose HLO is read.
    step = step.lower(state, put(data[0]), jnp.int32(1)).compile()
    losses = []
    for i, batch in enumerate(data):
      state, metrics = step(state, put(batch), jnp.int32(i + 1))
      if i == 0:
        first_metrics = jax.device_get(metrics)
        grads = jax.tree.map(lambda mu: np.asarray(mu) / (1 - optimizer_lib.B1),
                             jax.device_get(state['opt'][1][0].mu))
      losses.append(float(metrics['loss']))
    hlo = step.as_text()
  assert bool(first_metrics['finite'])
  return dict(loss=losses[0], grads=grads, selection=jax.device_get(inter),
              metrics=first_metrics, losses=np.array(losses), hlo=hlo, state_sh=state_sh)


@pytest.fixture(scope='module')
def results():
  """run(name, mesh name or None), each computed once per module."""
  memo = {}

  def get(name, mesh=None):
    if (name, mesh) not in memo:
      memo[name, mesh] = run(name, MESHES[mesh] if mesh else None)
    return memo[name, mesh]
  return get


def selections(tree):
  """{path: array} of the routing decisions: experts' selections and MoD plans (the
  experts' row plan exists on one device only)."""
  return {key: np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if "['experts']['plan']" not in (key := jax.tree_util.keystr(path))}


# Every mesh for MoD + MoMa (two expert groups, depth routing); the one-group and the
# token-choice models on the expert-parallel mesh, the one that moves their rows.
@pytest.mark.parametrize('name, mesh', [
    *(('mod_moma_4t4i', mesh) for mesh in MESHES),
    ('moe_8x', 'data=2 x expert=4'), ('mod_topk_8x', 'data=2 x expert=4')])
def test_sharded_step_equals_single_device(name, mesh, results):
  ref, got = results(name), results(name, mesh)
  ref_sel, got_sel = selections(ref['selection']), selections(got['selection'])
  assert ref_sel.keys() == got_sel.keys() and any('selection' in k for k in ref_sel)
  for key in ref_sel:
    if key.endswith("['gate']") or key.endswith('.weight'):
      np.testing.assert_allclose(got_sel[key], ref_sel[key], rtol=1e-5, err_msg=key)
    else:   # token indices, counts: identical
      np.testing.assert_array_equal(got_sel[key], ref_sel[key], err_msg=key)
  np.testing.assert_allclose(got['loss'], ref['loss'], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
               got['grads'], ref['grads'])
  np.testing.assert_allclose(got['losses'], ref['losses'], rtol=1e-4)


def test_parameters_and_optimizer_state_are_placed_by_the_rules(results):
  sh = results('mod_moma_4t4i', 'data=2 x expert=4')['state_sh']
  experts = sh['params']['layer_1']['experts']['wi_0']                 # [E, D, F]
  assert experts.spec == P('expert', 'fsdp', 'tensor')
  assert experts.shard_shape((8, 32, 43)) == (2, 32, 43)
  mu = sh['opt'][1][0].mu['layer_1']['experts']['wi_0']
  assert mu == experts
  sh = results('mod_moma_4t4i', 'fsdp=2 x expert=2 x tensor=2')['state_sh']
  embedding = sh['params']['embed']['embedding']                        # [V, D]
  assert embedding.spec == P('tensor', 'fsdp')
  assert embedding.shard_shape((64, 32)) == (32, 16)
  experts = sh['params']['layer_1']['experts']['wi_0']
  # 43 hidden units do not split over tensor=2: that dimension stays whole.
  assert experts.spec == P('expert', 'fsdp', None)
  assert sh['opt'][1][0].nu['embed']['embedding'] == embedding


def test_expert_parallel_step_exchanges_rows_all_to_all(results):
  assert 'all-to-all' in results('moe_8x', 'data=2 x expert=4')['hlo']
  assert 'all-to-all' in results('mod_moma_4t4i', 'data=2 x expert=4')['hlo']
  assert 'all-to-all' in results('mod_moma_4t4i', 'fsdp=2 x expert=2 x tensor=2')['hlo']
  assert 'all-to-all' not in results('mod_moma_4t4i', 'data=8')['hlo']


# ----------------------------------------------------------------------------------
# The trainer on 8 devices: a checkpoint changes mesh; bad meshes are refused.
# ----------------------------------------------------------------------------------
def trainer_config(data_dir, mesh):
  """The tiny quickstart 4t4i of tests/conftest.py in 8 routing groups of one sequence."""
  from conftest import tiny_train_config
  c = tiny_train_config(data_dir, steps=3, ckpt_every=2, eval_every=100,
                        eval_max_batches=1)
  c.routing.group_size = 1
  c.mesh.update(MESHES[mesh])
  return configs.validate(c)


def test_checkpoint_from_one_mesh_resumes_on_another(data_setup, tmp_path):
  from moma_jax.training import metrics_log
  data_dir = data_setup[0].data.data_dir
  reference = tmp_path / 'reference'
  train.train(trainer_config(data_dir, 'data=8'), str(reference))

  def stop_at_2(step):
    if step == 2:
      signal.raise_signal(signal.SIGTERM)
  moved = tmp_path / 'moved'
  assert train.train(trainer_config(data_dir, 'data=8'), str(moved),
                     on_step=stop_at_2)['step'] == 2
  assert train.train(trainer_config(data_dir, 'data=2 x expert=4'), str(moved))['step'] == 3
  want = [r for r in metrics_log.read_rows(str(reference)) if 'loss' in r]
  got = [r for r in metrics_log.read_rows(str(moved)) if 'loss' in r]
  assert [r['step'] for r in got] == [1, 2, 3]
  for a, b in zip(got, want):
    assert a['tokens'] == b['tokens'] and a['train_flops'] == b['train_flops']
    for key in ('loss', 'loss/text', 'loss/image'):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=f'{key} {a["step"]}')


@pytest.mark.parametrize('overrides, message', [
    (['--config.mesh.data=3'], 'mesh: data=3 x fsdp=1 x expert=1 x tensor=1 is 3 devices, '
                               'but there are 8'),
    (['--config.mesh.data=1', '--config.mesh.expert=8'], 'mesh.expert: 8 does not divide the 4'),
    (['--config.mesh.data=8', '--config.train.batch_size=16'], '2 routing groups per '
                                                               'micro-batch'),
])
def test_bad_mesh_exits_2_with_one_line(overrides, message, tmp_path, capsys):
  workdir = tmp_path / 'run'
  with pytest.raises(SystemExit) as exit_info:
    train_cli.run(['moma-train', '--config', f'{ROOT}/experiments/quickstart.py:moma_4t4i',
               f'--workdir={workdir}', *overrides])
  err = capsys.readouterr().err.strip().splitlines()
  assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
  assert not workdir.exists()


def test_a_smaller_expert_buffer_cuts_rows_and_counts_them(results):
  exact = results('moe_8x', 'data=2 x expert=4')
  assert exact['metrics']['route/dropped/all'] == 0
  cut = run('moe_8x', MESHES['data=2 x expert=4'], ep_buffer_factor=0.5)
  assert 0.3 < cut['metrics']['route/dropped/all'] < 0.7
  assert np.isfinite(cut['loss']) and cut['loss'] != exact['loss']


def test_pallas_kernels_inside_the_expert_parallel_step(results):
  """model.kernels='pallas' (interpret mode) in shard_map equals the XLA path."""
  ref = results('moe_8x', 'data=2 x expert=4')
  got = run('moe_8x', MESHES['data=2 x expert=4'], kernels='pallas')
  ref_sel, got_sel = selections(ref['selection']), selections(got['selection'])
  for key in ref_sel:
    if key.endswith("['idx']") or key.endswith("['kept']"):
      np.testing.assert_array_equal(got_sel[key], ref_sel[key], err_msg=key)
  np.testing.assert_allclose(got['loss'], ref['loss'], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               got['grads'], ref['grads'])
  np.testing.assert_allclose(got['losses'], ref['losses'], rtol=1e-4)


def test_cpu_ragged_all_to_all_is_the_documented_collective():
  """CPUs lack `jax.lax.ragged_all_to_all`, so every expert-parallel test above runs the
  exchange through its emulation: device t receives from every device s the run
  operand_s[input_offsets_s[t] : + send_sizes_s[t]] at output_t[output_offsets_s[t] :]
  and keeps the rest of its output. Random runs over an expert axis of 8 devices."""
  from moma_jax.model import ragged_exchange
  x, s_rows, r, d = 8, 12, 20, 3
  rng = np.random.default_rng(1)
  sizes = rng.integers(0, 2, (x, x)).astype(np.int32)        # [s, t]: rows s sends t
  in_off = (np.cumsum(sizes, 1) - sizes).astype(np.int32)
  base = rng.integers(0, 4, (x,))                            # runs land past a gap
  out_off = (np.cumsum(sizes, 0) - sizes + base).astype(np.int32)
  operand = rng.normal(size=(x, s_rows, d)).astype(np.float32)
  output = rng.normal(size=(x, r, d)).astype(np.float32)
  want = output.copy()
  for src in range(x):
    for t in range(x):
      n = sizes[src, t]
      want[t, out_off[src, t]:out_off[src, t] + n] = operand[src, in_off[src, t]:in_off[src, t] + n]

  mesh = jax.make_mesh((x,), ('expert',), axis_types=(jax.sharding.AxisType.Auto,))
  def body(operand, output, in_off, sizes, out_off, recv):
    return ragged_exchange.emulated_ragged_all_to_all(
        operand[0], output[0], in_off[0], sizes[0], out_off[0], recv[0],
        axis_name='expert')[None]
  spec = P('expert')
  got = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec))(
      operand, output, in_off, sizes, out_off, np.ascontiguousarray(sizes.T))
  np.testing.assert_array_equal(np.asarray(got), want)
