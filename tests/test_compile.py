"""Every accelerator path builds: TPU compiles on device-less devices, CUDA lowerings.

TPU: the quickstart's models (2 layers) compile for v5p:2x2x1 (4 chips) through libtpu,
no TPU needed; skipped where libtpu is not installed. CUDA: the Pallas kernels and a
whole training step lower through Triton on this CPU machine (compiling needs a GPU).
"""
import functools
import importlib.util
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma_jax.compilation import aot
import pallas_kernels
# moma-aux's flags too: the suite runs the CLIs in one process, where flag names clash
# unless each is its own (moma-aux --steps is an integer).
from moma_jax.compilation import compile_report
from moma_jax.analysis import flops
from moma_jax.analysis import hlo_parts
from moma_jax.analysis import hlo_stats
from moma_jax.cli import aux as aux_cli  # noqa: F401  pylint: disable=unused-import
from moma_jax.cli import compile as compile_cli
from moma_jax import configs
from moma_jax.model import attention_kernels
from moma_jax.model import kernels as kernels_lib

QUICKSTART = os.path.join(os.path.dirname(__file__), '..', 'experiments', 'quickstart.py')
TOPOLOGY = 'v5p:2x2x1'
TRITON = '__gpu$xla.gpu.triton'
needs_libtpu = pytest.mark.skipif(not aot.has_libtpu(),
                                  reason="libtpu is not installed: pip install -e '.[tpu]'")


def quickstart(variant, **overrides):
  """The quickstart variant at 2 layers, groups of 4 sequences, with dotted overrides."""
  spec = importlib.util.spec_from_file_location('quickstart', QUICKSTART)
  qs = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(qs)
  c = qs.get_config(variant)
  c.model.num_layers = 2
  c.routing.group_size = 4
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return configs.validate(c)


# ----------------------------------------------------------------------------------
# TPU: training steps, the decode step
# ----------------------------------------------------------------------------------
@needs_libtpu
@pytest.mark.parametrize('variant, kernels, layout, data, expert', [
    ('dense', 'xla', 'ragged', 2, 2),
    ('moma_4t4i', 'pallas', 'ragged', 4, 1),        # megablox gmm on TPU
    ('moe_8x', 'xla', 'capacity', 2, 2),
    ('mod_moma_4t4i', 'pallas', 'capacity', 2, 2),
])
def test_training_step_compiles_for_tpu(variant, kernels, layout, data, expert):
  config = quickstart(variant, **{'model.kernels': kernels, 'routing.layout': layout,
                                  'mesh.data': data, 'mesh.expert': expert})
  target = aot.tpu_target(config, TOPOLOGY)
  r = compile_report.measure(config, target, 'train')
  assert r['compiled'] and r['devices'] == 4
  mem = r['memory']
  assert mem['temporaries'] > 0 and mem['state'] <= mem['arguments']
  # Training costs more than the analytic model FLOPs (full attention squares, routing,
  # optimizer) but not several times more at this size.
  assert 1.0 < r['flops']['ratio'] < 3.0, r['flops']
  # Gradients are summed over the batch shards.
  assert 'all-reduce' in r['collectives']
  routed = variant != 'dense'
  assert ('ragged-all-to-all' in r['collectives']) == (routed and expert > 1)
  if kernels == 'pallas' and layout == 'ragged':
    gmm = [k for k in r['kernels'] if k['backend'] == 'Mosaic TPU']
    assert gmm and all(k['counted'] for k in gmm), r['kernels']
  assert not r['uncounted']


@needs_libtpu
def test_decode_step_compiles_for_tpu():
  """A MoMa model decodes through (abstract) auxiliary routers and a KV cache."""
  config = quickstart('moma_4t4i', **{'mesh.data': 2, 'mesh.expert': 2})
  r = compile_report.measure(config, aot.tpu_target(config, TOPOLOGY), 'decode')
  assert r['compiled'] and r['tokens'] == config.train.batch_size
  # The cache: per layer keys and values [B, S, H, K], split over the 4 chips.
  m = config.model
  cache = 2 * m.num_layers * config.train.batch_size * m.max_len * m.d_model * 4 // 4
  assert r['memory']['state'] > cache


# ----------------------------------------------------------------------------------
# CUDA: every Pallas kernel, forward and backward, and a training step lower to Triton
# ----------------------------------------------------------------------------------
def _kernel_cases():
  rng = np.random.default_rng(0)
  f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  t, d, e, c, f = 64, 32, 4, 16, 48
  index = jnp.asarray(rng.integers(0, t + 1, (e * c,)), jnp.int32)
  sizes = jnp.asarray([16, 8, 24, 8], jnp.int32)
  w = lambda: (f32(e, d, f), f32(e, d, f), f32(e, f, d))
  return {
      'expert_choice_select': (
          lambda s: pallas_kernels.expert_choice(s, jnp.ones((2, 32, 1), bool), 8)[1].sum(),
          (f32(2, 32, e),)),
      'dispatch_gather_rows': (
          lambda x: pallas_kernels.gather_rows(x, index, rows_per_token=e).sum(), (f32(t, d),)),
      'combine_rows': (
          lambda o, g: pallas_kernels.combine_rows(o, g, index, t, e).sum(),
          (f32(e * c, d), f32(e * c))),
      'grouped_matmul': (
          lambda x, *ws: pallas_kernels.swiglu_capacity(x, *ws).sum(), (f32(e, c, d), *w())),
      'ragged_matmul': (
          lambda x, *ws: pallas_kernels.swiglu_ragged(x, sizes, *ws).sum(),
          (f32(e * c, d), *w())),
  }


@pytest.mark.parametrize('name', sorted(_kernel_cases()))
def test_pallas_kernel_lowers_to_triton_forward_and_backward(name):
  fn, args = _kernel_cases()[name]
  grad = jax.value_and_grad(fn, argnums=tuple(range(len(args))))
  with pallas_kernels.target_backend('cuda'):
    text = jax.jit(grad).trace(*args).lower(lowering_platforms=('cuda',)).as_text()
  calls = hlo_stats.kernels(text)
  assert calls and all(k['target'] == TRITON for k in calls), calls
  names = {k['name'] for k in calls}
  # The forward kernel itself; the backward runs it or others (value_and_grad keeps both).
  assert any(n.startswith(name) for n in names), names


def test_training_step_with_pallas_kernels_lowers_for_cuda():
  config = quickstart('moma_4t4i', **{'model.kernels': 'pallas'})
  r = compile_report.measure(config, aot.cuda_target(config), 'train')
  assert r['lowered'] and not r['compiled']
  names = {k['name'] for k in r['kernels'] if k['backend'] == 'Triton'}
  assert {'expert_choice_select', 'dispatch_gather_rows', 'ragged_matmul',
          'ragged_transposed_matmul', 'combine_rows'} <= names, names
  # The Triton lowering drops cost estimates: none of them is counted.
  assert sorted(set(r['uncounted'])) == sorted(names)


@pytest.mark.parametrize('kernels', ['auto', 'xla'])
def test_gpu_default_computes_only_each_experts_rows(kernels):
  """The quickstart moma_4t4i training step lowered for a GPU: with `auto` no expert
  matmul is XLA's ragged_dot (a dense matmul over every expert on GPU) but a grouped
  matmul kernel; `xla` keeps ragged_dot, which the check must be able to see."""
  config = quickstart('moma_4t4i', **{'model.kernels': kernels})
  target = aot.cuda_target(config)
  text = aot.lower(aot.build_step(config, target, 'train'), target).as_text()
  ragged_dots = re.findall(r'ragged[-_]dot', text)
  names = {k['name'] for k in hlo_stats.kernels(text) if k['backend'] == 'Triton'}
  if kernels == 'xla':
    assert ragged_dots and 'ragged_matmul' not in names
    return
  assert not ragged_dots
  # On a host without a GPU tokamax's kernels cannot trace: the grouped matmul is ours,
  # forward, and backward (the weights' gradient as a transposed grouped matmul).
  assert kernels_lib.gpu_grouped_matmul() == 'triton'
  assert {'ragged_matmul', 'ragged_transposed_matmul'} <= names, names


# ----------------------------------------------------------------------------------
# HLO text: collectives per step
# ----------------------------------------------------------------------------------
def test_collectives_count_loop_bodies_by_trip_count():
  hlo = '\n'.join([
      'HloModule m', '',
      '%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {',
      '  %ar = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={}',
      '}', '',
      'ENTRY %main (a: f32[16,4]) -> f32[64,4] {',
      '  %ag-start = (f32[16,4]{1,0}, f32[64,4]{1,0}) all-gather-start(f32[16,4]{1,0} %a)',
      '  %ag-done = f32[64,4]{1,0:T(8,128)} all-gather-done(%ag-start)',
      '  %w = (s32[], f32[8]) while(%t), condition=%c, body=%body, '
      'backend_config={"known_trip_count":{"n":"3"}}',
      '  %a2a = (bf16[2,8]{1,0}, bf16[2,8]{1,0}) all-to-all(%y, %z), dimensions={0}',
      '}'])
  got = hlo_stats.collectives(hlo)
  assert got == {'all-to-all': dict(count=1, bytes=2 * 2 * 8 * 2),
                 'all-gather': dict(count=1, bytes=64 * 4 * 4),
                 'all-reduce': dict(count=3, bytes=3 * 8 * 4)}


# ----------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------
def _run(argv, capsys):
  compile_cli.run(['moma-compile', *argv])
  return capsys.readouterr()


@needs_libtpu
@pytest.mark.parametrize('mesh', [['--config.mesh.data=8'],
                                  ['--config.mesh.expert=4', '--config.routing.group_size=8']])
def test_a_mesh_the_topology_cannot_hold_is_one_line_exit_2(mesh, capsys):
  with pytest.raises(SystemExit) as exit_info:
    _run(['--config', f'{QUICKSTART}:moma_4t4i', '--topology', TOPOLOGY, *mesh], capsys)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('moma-compile: error: mesh'), err
  assert 'Traceback' not in err


@needs_libtpu
def test_json_output_is_consistent(capsys):
  argv = ['--config', f'{QUICKSTART}:moma_4t4i', '--topology', TOPOLOGY, '--json',
          '--config.model.num_layers=2', '--config.routing.group_size=4',
          '--config.mesh.data=2', '--config.mesh.expert=2']
  out = json.loads(_run(argv, capsys).out)
  config = quickstart('moma_4t4i', **{'mesh.data': 2, 'mesh.expert': 2})
  assert out['topology'] == TOPOLOGY and [s['step'] for s in out['steps']] == ['train']
  r = out['steps'][0]
  m = r['memory']
  assert m['total'] == m['arguments'] + m['outputs'] + m['temporaries'] + m['code'] - m['aliased']
  assert m['fits'] == (m['total'] <= m['hbm']) and m['margin'] == m['hbm'] - m['total']
  f = r['flops']
  tokens = config.train.batch_size * config.data.seq_len
  assert r['tokens'] == tokens
  assert f['analytic'] == pytest.approx(flops.count(config).train['overall'] * tokens / 4)
  assert f['ratio'] == pytest.approx(f['compiled'] / f['analytic'])
  assert r['collective_bytes'] == sum(c['bytes'] for c in r['collectives'].values()) > 0
  e = r['roofline']
  assert e['step_s'] == pytest.approx(max(e['compute_s'], e['memory_s'], e['collective_s']))
  assert e['compute_s'] == pytest.approx(f['compiled'] / r['chip']['peak_flops'])
  assert e['mfu'] == pytest.approx(f['analytic'] / (e['step_s'] * r['chip']['peak_flops']))
  parts = r['bytes_by_part']
  assert list(parts) == [*hlo_parts.PARTS, 'unattributed']
  assert sum(parts.values()) == int(f['bytes_accessed'])
  assert all(parts[p] > 0 for p in ('ffn', 'attention', 'routing', 'output', 'optimizer',
                                     'collectives'))
  # The HBM count: every part, no remainder, below the cost analysis' total (which
  # also counts what the compiler prefetches into VMEM); the second estimate reads it.
  hbm = r['hbm_bytes_by_part']
  assert list(hbm) == list(hlo_parts.PARTS) and r['hbm_bytes'] == sum(hbm.values())
  assert all(hbm[p] > 0 for p in ('ffn', 'attention', 'routing', 'optimizer'))
  assert r['hbm_bytes'] < f['bytes_accessed']
  h = r['roofline_hbm']
  assert h['memory_s'] == pytest.approx(r['hbm_bytes'] / r['chip']['hbm_bandwidth'])
  assert h['compute_s'] == e['compute_s'] and h['memory_s'] < e['memory_s']


@needs_libtpu
def test_the_hbm_count_leaves_out_what_the_tpu_keeps_on_the_chip():
  """A column sum on one v5p chip. Of a 256 MiB f32 array, which stays in HBM, the HBM
  count (the scalar initial value padded to 128 lanes, as laid out) is the cost
  analysis' total. Of a 16 MiB array the compiler prefetches into VMEM, it is the one
  read from HBM, while the cost analysis counts 80 MiB."""
  device = aot.topology_devices(TOPOLOGY)[0]
  sharding = jax.sharding.SingleDeviceSharding(device)

  def counts(rows):
    array = jax.ShapeDtypeStruct((rows, 1024), jnp.float32, sharding=sharding)
    compiled = jax.jit(lambda a: a.sum(0)).lower(array).compile()
    hlo = compiled.as_text()
    return (hlo_stats.cost(compiled)['bytes_accessed'],
            sum(hlo_parts.bytes_by_part(hlo).values()),
            sum(hlo_parts.bytes_by_part(hlo, hbm_only=True).values()))
  read = lambda rows, scalar: rows * 1024 * 4 + scalar + 1024 * 4   # input, init, result
  cost, every, hbm = counts(65536)
  assert cost == hbm == read(65536, 128 * 4) and every == read(65536, 4)
  cost, every, hbm = counts(4096)
  assert hbm == read(4096, 128 * 4) and read(4096, 4) < every < cost
  assert cost == pytest.approx(5 * 4096 * 1024 * 4, rel=1e-3)


@needs_libtpu
def test_a_program_larger_than_hbm_is_a_verdict_exit_0(capsys):
  argv = ['--config', f'{QUICKSTART}:dense', '--topology', TOPOLOGY, '--json',
          '--config.model.num_layers=2', '--config.model.d_model=16384',
          '--config.model.num_heads=32', '--config.model.ffn_dim=65536',
          '--config.routing.group_size=4']
  r = json.loads(_run(argv, capsys).out)['steps'][0]
  m = r['memory']
  assert not r['compiled'] and not m['fits']
  # The float32 gradients of every parameter (replicated: data=4) are temporaries.
  params = flops.count(quickstart('dense', **{
      'model.num_layers': 2, 'model.d_model': 16384, 'model.num_heads': 32,
      'model.ffn_dim': 65536})).params_total
  assert m['required'] > max(m['hbm'], 4 * params) and m['hbm'] > 0
  assert m['margin'] == pytest.approx(m['hbm'] - m['required']) and m['margin'] < 0


@needs_libtpu
def test_variants_table_against_the_first_variant(capsys):
  argv = ['--config', f'{QUICKSTART}:dense', '--topology', TOPOLOGY, '--json',
          '--variants', 'dense,moe_8x', '--config.model.num_layers=1',
          '--config.routing.group_size=4', '--config.mesh.data=2', '--config.mesh.expert=2']
  rows = json.loads(_run(argv, capsys).out)['variants']
  assert [r['variant'] for r in rows] == ['dense', 'moe_8x']
  assert [r['paper_ratio'] for r in rows] == [1.0, 0.91]
  dense, moe = (r['roofline']['tokens_per_sec'] for r in rows)
  assert rows[0]['ratio_to_first'] == 1.0
  assert rows[1]['ratio_to_first'] == pytest.approx(moe / dense)
  dense, moe = (r['roofline_hbm']['tokens_per_sec'] for r in rows)
  assert rows[0]['hbm_ratio_to_first'] == 1.0
  assert rows[1]['hbm_ratio_to_first'] == pytest.approx(moe / dense)
  # The variants are different programs: only the MoE one exchanges rows.
  assert 'ragged-all-to-all' in rows[1]['collectives']
  assert 'ragged-all-to-all' not in rows[0]['collectives']
  # Only the MoE one routes; both have FFN matmuls and an optimizer update.
  dense_parts, moe_parts = (r['bytes_by_part'] for r in rows)
  assert dense_parts['routing'] == 0 < moe_parts['routing']
  assert min(dense_parts['ffn'], moe_parts['ffn'], dense_parts['optimizer']) > 0


def test_cuda_text_says_lowering_only(capsys):
  argv = ['--config', f'{QUICKSTART}:moe_8x', '--platform', 'cuda',
          '--config.model.num_layers=1', '--config.model.kernels=pallas']
  out = _run(argv, capsys).out
  assert 'lowered only' in out
  assert 'ragged expert matmuls on triton' in out and 'XLA ragged_dot ops: 0' in out, out
  assert re.search(r'Triton\s+ragged_matmul\s+x\d+', out), out


@needs_libtpu
def test_remat_table_reports_memory_for_each_policy(capsys):
  """--remat: the training step once per policy; saving less costs recomputation."""
  compile_cli.run(['moma-compile', '--config', f'{QUICKSTART}:dense', '--topology', TOPOLOGY,
                   '--config.model.num_layers=2', '--config.mesh.data=4',
                   '--config.routing.group_size=4',
                   '--remat', 'none,block_input,offload', '--json'])
  rows = {r['remat']: r for r in json.loads(capsys.readouterr().out)['remat']}
  assert set(rows) == {'none', 'block_input', 'offload'}
  assert all(r['compiled'] for r in rows.values())
  temp = {k: r['memory']['temporaries'] for k, r in rows.items()}
  ratio = {k: r['flops']['ratio'] for k, r in rows.items()}
  assert temp['block_input'] < temp['none'] and ratio['block_input'] > ratio['none']
  # The offloaded outputs live in host memory during the step (at this size the staging
  # costs about what it saves in HBM).
  assert [k for k, r in rows.items() if r['memory']['host_offload']] == ['offload']


@needs_libtpu
def test_tiles_table_compiles_each_tiling(capsys):
  """--tiles: the training step once per megablox tiling; the 128-row tile pads the
  rows further than the chosen one, which shows in the compiled FLOPs."""
  compile_cli.run(['moma-compile', '--config', f'{QUICKSTART}:moma_4t4i', '--topology',
                   TOPOLOGY, '--config.model.num_layers=1', '--config.mesh.data=4',
                   '--config.routing.group_size=4', '--tiles', 'auto,128x128x128', '--json'])
  rows = json.loads(capsys.readouterr().out)['matmul_tiles']
  assert [r['matmul_tiles'] for r in rows] == ['auto', '128x128x128']
  assert all(r['compiled'] and r['flops']['bytes_accessed'] > 0 for r in rows)
  assert rows[0]['flops']['compiled'] != rows[1]['flops']['compiled']


@needs_libtpu
def test_bad_tiles_are_one_line_exit_2(capsys):
  with pytest.raises(SystemExit) as e:
    compile_cli.run(['moma-compile', '--config', f'{QUICKSTART}:moma_4t4i', '--topology',
                     TOPOLOGY, '--tiles', 'auto,100x128x128'])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count('\n') == 1
  assert err.startswith('moma-compile: error: --tiles: model.matmul_tiles: '), err


@functools.cache
def expert_parallel_step():
  """The quickstart's moma_4t4i on data=2 x expert=2, compiled for v5p once per
  process (the tests that read it share an xdist group, so one process)."""
  config = quickstart('moma_4t4i', **{'mesh.data': 2, 'mesh.expert': 2})
  target = aot.tpu_target(config, TOPOLOGY)
  return aot.compile_tpu(aot.lower(aot.build_step(config, target, 'train'), target))


@needs_libtpu
@pytest.mark.xdist_group('expert_parallel_step')
def test_expert_parallel_receive_path_is_a_ragged_matmul_on_tpu():
  """expert=2: only the used rows travel (`ragged-all-to-all`, the row counts first),
  and the receiving device runs the ragged grouped matmul over the rows it got
  (megablox, which kernels=auto takes on TPU), not a batched matmul over the whole
  buffers."""
  hlo = expert_parallel_step().as_text()
  collectives = hlo_stats.collectives(hlo)
  assert 'ragged-all-to-all' in collectives, collectives
  # No whole buffers: what all-to-all is left moves counts (bytes, not rows).
  assert collectives.get('all-to-all', {}).get('bytes', 0) < 1024, collectives
  found = hlo_stats.kernels(hlo)
  assert {'gmm', 'tgmm'} <= {k['name'] for k in found}, found
  # Every kernel but splash attention's (counted from its blocks) gives XLA its cost.
  assert all(k['counted'] for k in found
             if not k['name'].startswith(attention_kernels.SPLASH_KERNEL_PREFIX)), found


@needs_libtpu
@pytest.mark.xdist_group('expert_parallel_step')
def test_the_step_takes_the_expert_weights_and_moments_row_major_on_tpu():
  """Left to the TPU, an array takes the layout that pads it least: an expert weight
  [E, D, F] whose F (341 here) is no multiple of 128 lanes goes D-minor, and the step
  copied every expert weight and Adam moment into the grouped matmuls' row-major and
  back. With the trainer's formats (runs/state.py) the step takes them row-major and
  no copy of them is left; the other arrays keep the TPU's own choice."""
  compiled = expert_parallel_step()
  (state_formats, _, _), _ = compiled.input_formats
  orders = {jax.tree_util.keystr(path): f.layout.major_to_minor
            for path, f in jax.tree_util.tree_flatten_with_path(state_formats)[0]}
  experts = {k: v for k, v in orders.items() if "['experts']['w" in k}
  assert len(experts) == 3 * 2 * 3 and set(experts.values()) == {(0, 1, 2)}, experts
  assert orders["['params']['layer_0']['attention']['query']['kernel']"] != (0, 1, 2)
  copies = re.findall(r' copy\(.*op_name="state[^"]*experts', compiled.as_text())
  assert not copies, copies[:3]
