"""pallas_kernels: every kernel equals its reference, in value and gradient.

On CPU the kernels run in interpret mode (the only way Pallas runs there), so shapes are
tiny: N <= 64, D <= 32, F <= 48, E <= 8, with tiles small enough that every size is
split into several tiles and none is a tile multiple. Each check is one jitted
function (one compilation) to keep the file fast.

Axis legend: G groups, N tokens per group, E experts, K slots, R rows, C rows per
expert, D embed, F hidden, T tokens.
"""
from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma_jax.model import experts
from moma_jax.model import kernels
from moma_jax.model import routing
import pallas_kernels as pk

XLA = kernels.XLA             # moma_jax's XLA path: the references the model uses

SMALL_TILES = (16, 16, 16)     # matmul (BM, BK, BN): Triton's minimum, forces padding
ROW_TILES = (8, 16)            # gather/combine (rows, columns) per program
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 4e-2}   # relative to the reference's scale


def assert_close(actual, expected, dtype, what=''):
  """max |actual - expected| <= tol * max(1, max |expected|), tol by dtype."""
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  assert actual.shape == expected.shape, what
  scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
  err = float(np.abs(actual - expected).max(initial=0.0))
  assert err <= TOL[dtype] * scale, f'{what}: max error {err} (scale {scale})'


def jit_vjp(f, *args, cotangent_seed=0):
  """f's output and the gradients of <output, random cotangent> w.r.t. all args."""
  rng = np.random.default_rng(cotangent_seed)

  def cotangent(leaf):        # integer outputs (selected indices) take float0 zeros
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      return jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype)
    return np.zeros(leaf.shape, jax.dtypes.float0)
  ct = jax.tree.map(cotangent, jax.eval_shape(f, *args))

  @jax.jit
  def run(*a):
    y, pull = jax.vjp(f, *a)
    return y, pull(ct)
  return run(*args)


def normal(rng, shape, dtype, scale=1.0):
  return jnp.asarray(rng.normal(size=shape) * scale, dtype)


# ----------------------------------------------------------------------------------
# Selection.
# ----------------------------------------------------------------------------------
def _selection_case(name):
  """(scores [G, N, E], eligible, capacity fraction) for one named case."""
  rng = np.random.default_rng({'mixed': 10, 'k_equals_n': 11, 'broadcast': 12}.get(name, 13))
  if name == 'mixed':            # per-expert eligibility; group 0 none, group 1 all; ties
    g, n, e = 3, 24, 4
    eligible = rng.random((g, n, e)) < 0.4
    eligible[0], eligible[1] = False, True
    cap = fractions.Fraction(1, 4)
  elif name == 'k_equals_n':     # K == N: every token in every slot list
    g, n, e = 2, 16, 3
    eligible = rng.random((g, n, 1)) < 0.5
    cap = fractions.Fraction(1)
  elif name == 'broadcast':      # [G, N, 1] eligibility, N not a power of two
    g, n, e = 2, 40, 8
    eligible = rng.random((g, n, 1)) < 0.7
    eligible[1] = True
    cap = fractions.Fraction(1, 8)
  else:                          # 'wide': N = 64, half the tokens per expert
    g, n, e = 1, 64, 2
    eligible = rng.random((g, n, e)) < 0.8
    cap = fractions.Fraction(1, 2)
  # Scores rounded to one decimal: many ties, which must break towards the lower index.
  scores = np.round(rng.random((g, n, e)), 1).astype(np.float32)
  return jnp.asarray(scores), jnp.asarray(eligible), cap


@pytest.mark.parametrize('name', ['mixed', 'k_equals_n', 'broadcast', 'wide'])
def test_selection_equals_routing_expert_choice(name):
  scores, eligible, cap = _selection_case(name)
  ref = routing.expert_choice(scores, eligible, cap)
  ref_idx, ref_gate = ref.idx, ref.gate
  k = ref_idx.shape[-1]
  (idx, gate), (d_scores, _) = jit_vjp(
      lambda s, el: pk.expert_choice(s, el, k), scores, eligible)
  (ref2_idx, ref2_gate), (ref_d, _) = jit_vjp(
      lambda s, el: (lambda r: (r.idx, r.gate))(routing.expert_choice(s, el, cap)),
      scores, eligible)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_array_equal(np.asarray(gate).view(np.int32),
                                np.asarray(ref_gate).view(np.int32))     # bitwise
  np.testing.assert_array_equal(idx, ref2_idx)
  np.testing.assert_array_equal(gate, ref2_gate)
  np.testing.assert_array_equal(d_scores, ref_d)                 # a scatter: exact
  local = pk.expert_choice_reference(scores, eligible, k)
  np.testing.assert_array_equal(local[0], ref_idx)
  np.testing.assert_array_equal(local[1], ref_gate)


def test_selection_special_values_follow_top_k_order():
  """-0.0 < 0.0, NaN above inf, -NaN below -inf (IEEE total order, as top_k sorts)."""
  column = [0.0, -0.0, 1.0, np.nan, -np.inf, 0.0, -0.0, np.inf, -np.nan, 0.5]
  scores = jnp.asarray(np.array(column, np.float32)[None, :, None])
  eligible = jnp.asarray(np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], bool)[None, :, None])
  idx, gate = jax.jit(lambda s, el: pk.expert_choice(s, el, 10))(scores, eligible)
  ref_idx, ref_gate = pk.expert_choice_reference(scores, eligible, 10)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_array_equal(np.asarray(gate).view(np.int32),
                                np.asarray(ref_gate).view(np.int32))


# ----------------------------------------------------------------------------------
# Dispatch and combine.
# ----------------------------------------------------------------------------------
def _token_index(rng, t, r):
  """[R] indices: repeats, the dump index T, one wrapped negative, one far out."""
  index = rng.integers(0, t + 1, size=r).astype(np.int32)
  index[:3] = [t, -1, t + 5]
  return jnp.asarray(index)


def _max_rows_per_token(index, t):
  index = np.asarray(index)
  index = np.where(index < 0, index + t, index)
  index = index[(index >= 0) & (index < t)]
  return int(np.bincount(index, minlength=t).max())


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_gather_rows(dtype):
  rng = np.random.default_rng(1)
  t, r, d = 37, 45, 20
  x = normal(rng, (t, d), dtype)
  index = _token_index(rng, t, r)
  s = _max_rows_per_token(index, t)
  f = lambda x: pk.gather_rows(x, index, tiles=ROW_TILES)
  g = lambda x: pk.gather_rows(x, index, rows_per_token=s, tiles=ROW_TILES)
  ref = lambda x: XLA.gather(x, index, s)
  rows, (dx,) = jit_vjp(f, x)
  rows_s, (dx_s,) = jit_vjp(g, x)
  ref_rows, (ref_dx,) = jit_vjp(ref, x)
  np.testing.assert_array_equal(rows, ref_rows)                  # a gather: exact
  np.testing.assert_array_equal(rows_s, ref_rows)
  np.testing.assert_array_equal(pk.gather_rows_reference(x, index), ref_rows)
  assert_close(dx, ref_dx, dtype, 'dx (XLA backward)')
  assert_close(dx_s, ref_dx, dtype, 'dx (Pallas combine backward)')


def test_rows_of_token_is_the_inverse_map():
  index = jnp.asarray([2, 0, 2, 4, 1, 2, -1], jnp.int32)        # T = 4: 4 is absent
  rows, included = pk.rows_of_token(index, 4, 2)
  np.testing.assert_array_equal(rows, [[1, -1], [4, -1], [0, 2], [6, -1]])
  np.testing.assert_array_equal(included, [True, True, True, False, True, False, True])


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_combine_rows(dtype):
  rng = np.random.default_rng(2)
  t, r, d = 29, 50, 24
  out = normal(rng, (r, d), dtype)
  weight = jnp.asarray(rng.random(r), jnp.float32)
  index = _token_index(rng, t, r)
  s = _max_rows_per_token(index, t)
  y, (d_out, d_w) = jit_vjp(
      lambda o, w: pk.combine_rows(o, w, index, t, s, tiles=ROW_TILES), out, weight)
  ref_y, (ref_out, ref_w) = jit_vjp(lambda o, w: XLA.combine(o, w, index, t, s), out, weight)
  assert_close(y, ref_y, dtype, 'y')
  assert_close(d_out, ref_out, dtype, 'd_out')
  assert_close(d_w, ref_w, dtype, 'd_weight')
  assert_close(y, pk.combine_rows_reference(out, weight, index, t), dtype, 'y vs local ref')


# ----------------------------------------------------------------------------------
# Grouped matmul.
# ----------------------------------------------------------------------------------
def _weights(rng, e, d, f, dtype):
  return (normal(rng, (e, d, f), dtype, 0.3), normal(rng, (e, d, f), dtype, 0.3),
          normal(rng, (e, f, d), dtype, 0.3))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_swiglu_capacity(dtype):
  rng = np.random.default_rng(3)
  e, c, d, f = 3, 20, 24, 40                 # none a multiple of the 16-wide tiles
  rows = normal(rng, (e, c, d), dtype)
  w = _weights(rng, e, d, f, dtype)
  plan = routing.RoutingPlan(token_index=None, weight=None, rows_per_expert=None, wanted=None,
                             kept=None, capacity=c)
  y, grads = jit_vjp(lambda x, *w: pk.swiglu_capacity(x, *w, tiles=SMALL_TILES), rows, *w)
  ref_y, ref_grads = jit_vjp(
      lambda x, *w: experts.apply_experts(x.reshape(e * c, d), plan, *w).reshape(e, c, d),
      rows, *w)
  assert_close(y, ref_y, dtype, 'out')
  assert_close(pk.swiglu_capacity_reference(rows, *w), ref_y, dtype, 'local reference')
  for name, a, b in zip(('rows', 'wi_0', 'wi_1', 'wo'), grads, ref_grads):
    assert_close(a, b, dtype, f'd{name}')


RAGGED_SIZES = [10, 0, 23, 1]          # an empty expert; 50 - 34 rows past the groups


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_swiglu_ragged(dtype):
  rng = np.random.default_rng(4)
  r, d, f = 50, 24, 40
  gs = jnp.asarray(RAGGED_SIZES, jnp.int32)
  rows = normal(rng, (r, d), dtype)
  w = _weights(rng, len(RAGGED_SIZES), d, f, dtype)
  plan = routing.RoutingPlan(token_index=None, weight=None, rows_per_expert=gs, wanted=None,
                             kept=None)
  y, grads = jit_vjp(lambda x, *w: pk.swiglu_ragged(x, gs, *w, tiles=SMALL_TILES), rows, *w)
  ref_y, ref_grads = jit_vjp(lambda x, *w: experts.apply_experts(x, plan, *w), rows, *w)
  assert_close(y, ref_y, dtype, 'out')
  assert not np.asarray(y[sum(RAGGED_SIZES):], np.float32).any()   # zero past the groups
  assert_close(pk.swiglu_ragged_reference(rows, gs, *w), ref_y, dtype, 'local reference')
  for name, a, b in zip(('rows', 'wi_0', 'wi_1', 'wo'), grads, ref_grads):
    assert_close(a, b, dtype, f'd{name}')


@pytest.mark.parametrize('impl', ['megablox', 'tokamax'])
def test_swiglu_ragged_tpu_and_gpu_library_paths(impl):
  """The TPU path (megablox gmm, in interpret mode) and the GPU one (tokamax's
  ragged_dot; its GPU kernels trace only on a GPU, so here its XLA one checks the calls
  around them): equal to the reference, values and gradients."""
  rng = np.random.default_rng(5)
  r, d, f = 50, 24, 40
  gs = jnp.asarray(RAGGED_SIZES, jnp.int32)
  rows = normal(rng, (r, d), jnp.float32)
  w = _weights(rng, len(RAGGED_SIZES), d, f, jnp.float32)
  y, grads = jit_vjp(lambda x, *w: pk.swiglu_ragged(x, gs, *w, impl=impl,
                                                    tokamax_implementation='xla'), rows, *w)
  ref_y, ref_grads = jit_vjp(lambda x, *w: pk.swiglu_ragged_reference(x, gs, *w), rows, *w)
  assert_close(y, ref_y, jnp.float32, 'out')
  for a, b in zip(grads, ref_grads):
    assert_close(a, b, jnp.float32, 'grad')


@pytest.mark.parametrize('tiles, sizes', [
    (None, (0, 150, 0, 83)),            # the rule's tiles; empty experts, rows past them
    ((48, 256, 128), (0, 0, 300, 0)),   # one expert takes every row
    ((32, 128, 256), (7, 0, 0, 211)),
])
def test_megablox_tiles_and_fused_projection_equal_the_reference(tiles, sizes):
  """megablox (interpret mode) with the tiles chosen for the shapes, or given ones, and
  the gated projections as one matmul: values and gradients equal the reference at
  shapes that are no multiple of any tile (300 rows, D 136, F 200)."""
  rng = np.random.default_rng(15)
  r, d, f = 300, 136, 200
  gs = jnp.asarray(sizes, jnp.int32)
  rows = normal(rng, (r, d), jnp.float32)
  w = _weights(rng, len(sizes), d, f, jnp.float32)
  y, grads = jit_vjp(lambda x, *w: pk.swiglu_ragged(x, gs, *w, impl='megablox', tiles=tiles),
                     rows, *w)
  ref_y, ref_grads = jit_vjp(lambda x, *w: pk.swiglu_ragged_reference(x, gs, *w), rows, *w)
  assert_close(y, ref_y, jnp.float32, 'out')
  for name, a, b in zip(('rows', 'wi_0', 'wi_1', 'wo'), grads, ref_grads):
    assert_close(a, b, jnp.float32, f'd{name}')


# ----------------------------------------------------------------------------------
# The four kernels as one routed FFN, against the XLA path of moma_jax.
# ----------------------------------------------------------------------------------
def test_routed_ffn_pipeline_equals_xla_path():
  rng = np.random.default_rng(6)
  g, n, d, f, e = 2, 32, 16, 32, 4
  cap = fractions.Fraction(1, e)
  x = normal(rng, (g * n, d), jnp.float32)
  scores = jnp.asarray(np.round(rng.random((g, n, e)), 1), jnp.float32)
  eligible = jnp.asarray(rng.random((g, n, 1)) < 0.8)
  w = _weights(rng, e, d, f, jnp.float32)
  ref = routing.expert_choice(scores, eligible, cap)
  ref_idx, wanted = ref.idx, ref.wanted
  rows_total = g * e * ref_idx.shape[-1]         # ragged rows: every wanted row fits

  def pipeline(x, scores, *w, kernels):
    if kernels:
      idx, gate = pk.expert_choice(scores, eligible, ref_idx.shape[-1])
    else:
      sel = routing.expert_choice(scores, eligible, cap)
      idx, gate = sel.idx, sel.gate
    plan = routing.pack(routing.Selection(idx, gate, wanted), num_tokens=n, layout='ragged',
                        rows=rows_total, rows_per_token=e)
    if kernels:
      rows = pk.gather_rows(x, plan.token_index, rows_per_token=e, tiles=ROW_TILES)
      out = pk.swiglu_ragged(rows, plan.rows_per_expert, *w, tiles=SMALL_TILES)
      return pk.combine_rows(out, plan.weight, plan.token_index, g * n, e, tiles=ROW_TILES)
    rows = plan.dispatch(x, XLA)
    return plan.combine(experts.apply_experts(rows, plan, *w), XLA)

  y, grads = jit_vjp(lambda *a: pipeline(*a, kernels=True), x, scores, *w)
  ref_y, ref_grads = jit_vjp(lambda *a: pipeline(*a, kernels=False), x, scores, *w)
  assert_close(y, ref_y, jnp.float32, 'y')
  for name, a, b in zip(('x', 'scores', 'wi_0', 'wi_1', 'wo'), grads, ref_grads):
    assert_close(a, b, jnp.float32, f'd{name}')


# ----------------------------------------------------------------------------------
# Compiled kernels (GPU only).
# ----------------------------------------------------------------------------------
@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU')
def test_gpu_kernels_compile():
  """Every kernel compiled (interpret=False) equals its reference on the GPU."""
  rng = np.random.default_rng(7)
  # f32 matmuls in XLA may use TF32 on the GPU: compare at a looser tolerance there.
  tol = {jnp.float32: 1e-2, jnp.bfloat16: 5e-2}
  close = lambda a, b, dt, what: np.testing.assert_allclose(
      np.asarray(jnp.asarray(a, jnp.float32)), np.asarray(jnp.asarray(b, jnp.float32)),
      atol=tol[dt] * max(1.0, float(jnp.abs(jnp.asarray(b, jnp.float32)).max())),
      err_msg=what)
  g, n, e, k = 2, 200, 8, 50
  scores = jnp.asarray(np.round(rng.random((g, n, e)), 2), jnp.float32)
  eligible = jnp.asarray(rng.random((g, n, e)) < 0.6)
  idx, gate = jax.jit(lambda s, el: pk.expert_choice(s, el, k, interpret=False))(
      scores, eligible)
  ref_idx, ref_gate = pk.expert_choice_reference(scores, eligible, k)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_array_equal(gate, ref_gate)
  for dtype in (jnp.float32, jnp.bfloat16):
    t, r, d, f, experts_ = 300, 420, 96, 160, 4
    x = normal(rng, (t, d), dtype)
    index = _token_index(rng, t, r)
    s = _max_rows_per_token(index, t)
    rows, (dx,) = jit_vjp(lambda x: pk.gather_rows(
        x, index, rows_per_token=s, impl='pallas', interpret=False), x)
    ref_rows, (ref_dx,) = jit_vjp(lambda x: pk.gather_rows_reference(x, index), x)
    np.testing.assert_array_equal(rows, ref_rows)
    close(dx, ref_dx, dtype, 'gather dx')
    out = normal(rng, (r, d), dtype)
    weight = jnp.asarray(rng.random(r), jnp.float32)
    y, gy = jit_vjp(lambda o, w: pk.combine_rows(o, w, index, t, s, impl='pallas',
                                                 interpret=False), out, weight)
    ref_y, ref_gy = jit_vjp(lambda o, w: pk.combine_rows_reference(o, w, index, t),
                            out, weight)
    close(y, ref_y, dtype, 'combine')
    for a, b in zip(gy, ref_gy):
      close(a, b, dtype, 'combine grad')
    w = _weights(rng, experts_, d, f, dtype)
    blocks = normal(rng, (experts_, 70, d), dtype)
    y, gr = jit_vjp(lambda x, *w: pk.swiglu_capacity(x, *w, interpret=False), blocks, *w)
    ref_y, ref_gr = jit_vjp(pk.swiglu_capacity_reference, blocks, *w)
    close(y, ref_y, dtype, 'capacity')
    for a, b in zip(gr, ref_gr):
      close(a, b, dtype, 'capacity grad')
    gs = jnp.asarray([100, 0, 170, 90], jnp.int32)
    xr = normal(rng, (r, d), dtype)
    y, gr = jit_vjp(lambda x, *w: pk.swiglu_ragged(x, gs, *w, impl='pallas',
                                                   interpret=False), xr, *w)
    ref_y, ref_gr = jit_vjp(lambda x, *w: pk.swiglu_ragged_reference(x, gs, *w), xr, *w)
    close(y, ref_y, dtype, 'ragged')
    for a, b in zip(gr, ref_gr):
      close(a, b, dtype, 'ragged grad')
