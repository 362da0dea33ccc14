"""The CPU ragged SwiGLU (moma_jax/model/tiled_swiglu.py) equals `jax.lax.ragged_dot`.

Values and gradients (inputs and all three weights) against the `ragged_dot` reference
for group sizes that leave experts empty, give one expert every row, leave unused tail
rows, and split unevenly over blocks and tiles (rows all in blocks, mostly in tiles, and
between); the model's XLA ops use it on CPU and keep `ragged_dot` when lowered for
another platform; a tiny model's loss, gradients and routing plans are the same with
either op.

Axis legend: R rows, D embed, E experts, F hidden, C block rows per expert, T rows per
tile.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pallas_kernels
import numpy as np
import pytest

from conftest import tiny_config
from moma_jax.model import kernels
from moma_jax.model import loss as loss_lib
from moma_jax.model import tiled_swiglu
from moma_jax.model import transformer

R, D, F, E = 40, 8, 12, 5
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 4e-2}   # relative to the reference's scale

# name -> group sizes [E] (sum <= R); each case runs at several tile sizes.
CASES = {
    'random': [7, 13, 2, 9, 5],                 # 36 of 40 rows: an unused tail
    'empty_experts': [0, 17, 0, 23, 0],         # empty first, middle and last experts
    'one_expert_all_rows': [0, 0, R, 0, 0],
    'first_expert_all_rows': [R, 0, 0, 0, 0],
    'last_expert_all_rows': [0, 0, 0, 0, R],
    'nothing_routed': [0, 0, 0, 0, 0],
    'single_rows': [1, 1, 0, 1, 1],
}


def reference(rows, group_sizes, wi_0, wi_1, wo):
  h = jax.nn.silu(jax.lax.ragged_dot(rows, wi_0, group_sizes)) * jax.lax.ragged_dot(
      rows, wi_1, group_sizes)
  return jax.lax.ragged_dot(h, wo, group_sizes)


def operands(seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[-2]), dtype)
  return (jnp.asarray(rng.normal(size=(R, D)), dtype), normal(E, D, F), normal(E, D, F),
          normal(E, F, D), jnp.asarray(rng.normal(size=(R, D)), dtype))


def value_and_grads(f):
  """A jitted run(group_sizes, rows, wi_0, wi_1, wo, cotangent): f's output and the
  gradients of <output, cotangent> w.r.t. rows and the weights. The sizes are traced:
  one compilation serves every case."""
  @jax.jit
  def run(sizes, rows, wi_0, wi_1, wo, cotangent):
    y, pull = jax.vjp(lambda *a: f(a[0], sizes, *a[1:]), rows, wi_0, wi_1, wo)
    return (y,) + pull(cotangent)
  return lambda sizes, *args: run(jnp.asarray(sizes, jnp.int32), *args)


def assert_all_close(actual, expected, dtype, what):
  names = tuple(f'{what}: {n}' for n in ('value', 'd rows', 'd wi_0', 'd wi_1', 'd wo'))
  for name, a, e in zip(names, actual, expected):
    a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
    assert a.shape == e.shape, name
    scale = max(1.0, float(np.abs(e).max()))
    err = float(np.abs(a - e).max())
    assert err <= TOL[dtype] * scale, f'{name}: max error {err} (scale {scale})'


# (C, T): tiles only (one row per expert in blocks) at several T, the default C with
# overflow tiles, and blocks holding every row.
@pytest.mark.parametrize('block, tile', [(1, 1), (1, 4), (1, 16), (8, 1), (8, 4), (None, None),
                                         (R, 8)])
def test_equals_ragged_dot_in_values_and_gradients(block, tile):
  tiled = value_and_grads(
      lambda x, gs, *w: tiled_swiglu.swiglu_tiled(x, gs, *w, block=block, tile=tile))
  ragged = value_and_grads(reference)
  for case, sizes in CASES.items():
    args = operands(seed=len(case))
    actual, expected = tiled(sizes, *args), ragged(sizes, *args)
    assert_all_close(actual, expected, jnp.float32, case)
    # Rows past the routed ones are zero, in value and gradient, as ragged_dot's.
    used = sum(sizes)
    assert not np.asarray(actual[0][used:]).any(), case
    assert not np.asarray(actual[1][used:]).any(), case


def test_random_group_sizes_and_bfloat16():
  """Random sizes (some zero, summing to at most R) at the default tile, in float32
  and bfloat16."""
  rng = np.random.default_rng(7)
  tiled, ragged = value_and_grads(tiled_swiglu.swiglu_tiled), value_and_grads(reference)
  for dtype in (jnp.float32, jnp.bfloat16):
    args = operands(seed=3, dtype=dtype)
    for _ in range(4):
      sizes = rng.multinomial(int(rng.integers(0, R + 1)), rng.dirichlet(np.full(E, 0.5)))
      assert_all_close(tiled(sizes, *args), ragged(sizes, *args), dtype, str(sizes))


@pytest.mark.parametrize('skip', [0, 3])
def test_blocks_and_tiles_hold_each_routed_row_once(skip):
  sizes = [5, 0, 16, 3, 9]
  expert, first, end, count = jax.device_get(
      tiled_swiglu.tile_plan(jnp.asarray(sizes), R, tile=4, skip=skip))
  assert count == sum(-(-max(n - skip, 0) // 4) for n in sizes)
  assert len(expert) == (R + E * 3) // 4          # the static bound on tiles
  owner = np.full(R, -1)
  for e, lo, hi in zip(expert[:count], first[:count], end[:count]):
    assert 0 < hi - lo <= 4 and (owner[lo:hi] == -1).all()
    owner[lo:hi] = e
  to_block, from_block = jax.device_get(tiled_swiglu.block_indices(jnp.asarray(sizes), R,
                                                                   skip))
  assert (from_block[owner != -1] == E * skip).all()  # tiled rows are in no block
  for slot, row in enumerate(to_block):
    if row < R:
      assert owner[row] == -1 and from_block[row] == slot
      owner[row] = slot // skip
  assert (from_block[owner == -1] == E * skip).all()
  assert (owner == np.repeat(np.arange(E), sizes).tolist() + [-1] * (R - sum(sizes))).all()


def test_default_block_and_tile_rows():
  assert tiled_swiglu.block_rows(2064, 8) == 264    # the quickstart's sparse layers
  assert tiled_swiglu.tile_rows(2064, 8) == 64
  assert tiled_swiglu.block_rows(528, 8) == 72      # its mixture-of-depths layers
  assert tiled_swiglu.tile_rows(528, 8) == 16
  assert tiled_swiglu.tile_rows(5, 2) == 5


def test_xla_ops_use_it_on_cpu_and_keep_ragged_dot_elsewhere():
  """Chosen for the platform a program is traced for, with no conditional around it."""
  rows, wi_0, wi_1, wo, _ = operands(seed=1)
  sizes = jnp.asarray(CASES['random'], jnp.int32)

  def lowered(platform):
    f = jax.jit(jax.grad(lambda x, *w: kernels.XLA.swiglu_ragged(x, sizes, *w).sum(),
                         argnums=(0, 1, 2, 3)))
    with pallas_kernels.target_backend(platform):
      return f.trace(rows, wi_0, wi_1, wo).lower(lowering_platforms=(platform,)).as_text()
  cpu, cuda = lowered('cpu'), lowered('cuda')
  assert 'ragged_dot' not in cpu and 'while' in cpu and 'case' not in cpu
  assert 'ragged_dot' in cuda and 'while' not in cuda and 'case' not in cuda


def model_results(config):
  """(loss, gradients, routing plans) of one batch from a fixed init, one compilation."""
  model = transformer.build(config)
  params, _ = transformer.init(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  b, l = config.train.batch_size, config.data.seq_len
  segment = np.ones((b, l), np.int32)
  segment[0, -5:] = 0
  batch = dict(tokens=jnp.asarray(rng.integers(0, config.model.vocab_size, (b, l)), jnp.int32),
               modality=jnp.asarray(rng.random((b, l)) < 0.3, jnp.int8),
               segment_ids=jnp.asarray(segment),
               positions=jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)),
               loss_mask=jnp.asarray(segment))

  def loss(params):
    logits, sown = model.apply({'params': params}, batch['tokens'], batch['modality'],
                               batch['segment_ids'], batch['positions'],
                               mutable=['intermediates'])
    value, _ = loss_lib.next_token_loss(logits, batch, config.model.modalities,
                                        config.train.z_loss)
    return value, sown['intermediates']
  (value, sown), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  plans = {k: v for k, v in flat(sown).items() if 'plan' in k}
  return jax.device_get((value, flat(grads), plans))


def flat(tree):
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_model_loss_gradients_and_plans_equal_with_ragged_dot(monkeypatch):
  """MoMa 2t2i in two layers: the second layer's routing depends on the first layer's
  expert outputs."""
  config = tiny_config(experts=(2, 2), num_layers=2)
  assert config.routing.layout == 'ragged'
  assert kernels.resolve(config.model.kernels, 'cpu') is kernels.XLA
  loss, grads, plans = model_results(config)
  monkeypatch.setattr(tiled_swiglu, 'swiglu_tiled', reference)
  ref_loss, ref_grads, ref_plans = model_results(config)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert grads.keys() == ref_grads.keys()
  for key in grads:
    scale = max(1e-3, float(np.abs(ref_grads[key]).max()))
    np.testing.assert_allclose(grads[key], ref_grads[key], atol=2e-5 * scale, rtol=0,
                               err_msg=key)
  assert plans.keys() == ref_plans.keys()
  assert sum(k.endswith('rows_per_expert') for k in plans) == 2       # a plan per layer
  for key in plans:
    np.testing.assert_array_equal(plans[key], ref_plans[key], err_msg=key)
