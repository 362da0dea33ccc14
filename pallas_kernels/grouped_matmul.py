"""Grouped expert matmuls: the SwiGLU of every routed row with its expert's weights.

Axis legend: E experts, C rows per expert (capacity layout), R rows (ragged
layout), D embed, F SwiGLU hidden; inside the kernels M rows, K contraction, N output
columns, BM / BK / BN their tiles.

Two row layouts, as in `moma_jax.model.experts.apply_experts`:
  * `swiglu_capacity(rows [E, C, D], wi_0, wi_1 [E, D, F], wo [E, F, D])` -> [E, C, D]:
    expert e owns the contiguous block rows[e] (the 'capacity' layout of
    `routing.pack`); equals `jax.vmap(swiglu)` over experts.
  * `swiglu_ragged(rows [R, D], group_sizes [E], ...)` -> [R, D]: expert e's rows follow
    expert e-1's; rows past sum(group_sizes) come out zero; equals the
    `jax.lax.ragged_dot` path of `apply_experts`.

Kernels (all accumulate in float32 and write the input dtype):
  * `_bmm_kernel` — batched tiled matmul, grid (E, M / BM, N / BN). A program holds the
    [BM, K] row strip and the [K, BN] weight strip of its expert and loops over K in BK
    steps (an in-kernel loop, not a grid axis: GPU programs run concurrently, so they
    cannot accumulate across grid steps). With two weights and `glu=True` it keeps two
    accumulators and writes silu(a) * b: the SwiGLU's first half in one pass over rows.
  * `_ragged_kernel` — the same tile for ragged groups, grid (M / BM, N / BN). A row
    tile may straddle experts; the program loops over the experts its rows belong to
    (the range [lo, hi] is precomputed per tile from the group offsets in jnp) and adds
    each expert's product only into that expert's rows (a row mask), so no two
    programs write the same output tile. Tiles past the last group do nothing (zeros).
  * `_ragged_tmm_kernel` — per-expert weight gradients x_e^T @ dy_e for ragged groups,
    grid (E, K / BK, N / BN), looping over the row tiles that overlap expert e's rows
    with a row mask (empty experts give zeros).
Sizes that are not tile multiples are zero-padded in the wrappers and the results sliced;
tiles are powers of two >= 16 (Triton's `dot` minimum), shrunk for small dimensions.
Every pallas_call carries a cost estimate (`_common.cost`) for XLA's cost analysis.

Gradients (`jax.custom_vjp`, every matmul of the backward on the same kernels, the
SwiGLU's elementwise derivative in jnp): with a = x wi_0, b = x wi_1, h = silu(a) * b, out = h wo:
  dh = dout wo^T, dwo = h^T dout,
  da = dh * b * silu'(a), db = dh * silu(a),
  dx = [da db] [wi_0; wi_1]^T (one kernel call on the concatenated operands),
  d[wi_0 wi_1] = x^T [da db].
Transposed operands are formed by XLA (a copy) rather than by transposed-tile kernels.

The TPU and GPU libraries' grouped matmuls for the ragged layout (megablox, tokamax) are
`impl`s of `swiglu_ragged` too (pallas_kernels/library_matmul.py). For the capacity
layout the model takes `impl='xla'` on TPU, XLA's batched einsum, which XLA tiles well on
the MXU; `impl='pallas'` forces `_bmm_kernel` (untested under Mosaic).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common
from pallas_kernels import library_matmul

TILES = (64, 32, 64)        # (BM, BK, BN) defaults; Triton-friendly on H100 at 4 warps
_MIN_TILE = 16              # Triton's dot needs every operand dimension >= 16


# ----------------------------------------------------------------------------------
# References (jnp / XLA).
# ----------------------------------------------------------------------------------
def swiglu_capacity_reference(rows, wi_0, wi_1, wo):
  """out [E, C, D] = (silu(rows[e] wi_0[e]) * (rows[e] wi_1[e])) wo[e]."""
  ffn = lambda x, a, b, c: (jax.nn.silu(x @ a) * (x @ b)) @ c
  return jax.vmap(ffn)(rows, wi_0, wi_1, wo)


def swiglu_ragged_reference(rows, group_sizes, wi_0, wi_1, wo):
  """out [R, D] with `jax.lax.ragged_dot` (rows past sum(group_sizes) are zero)."""
  gs = group_sizes.astype(jnp.int32)
  h = jax.nn.silu(jax.lax.ragged_dot(rows, wi_0, gs)) * jax.lax.ragged_dot(rows, wi_1, gs)
  return jax.lax.ragged_dot(h, wo, gs)


# ----------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------
def _tile_products(x_ref, w_refs, prefix, nk: int, bk: int, shape):
  """Per weight, sum over K blocks of x[:, k] @ w[prefix, k, :] in float32 [BM, BN]."""
  def step(kk, accs):
    start = pl.multiple_of(kk * bk, bk)
    xk = x_ref[:, pl.ds(start, bk)]
    return tuple(
        acc + jnp.dot(xk, w_ref[prefix + (pl.ds(start, bk), slice(None))],
                      preferred_element_type=jnp.float32)
        for acc, w_ref in zip(accs, w_refs))
  init = tuple(jnp.zeros(shape, jnp.float32) for _ in w_refs)
  return jax.lax.fori_loop(0, nk, step, init)


def _epilogue(accs, glu: bool):
  if glu:
    a, b = accs
    return a * jax.nn.sigmoid(a) * b
  return accs[0]


def _bmm_kernel(x_ref, *refs, nk: int, bk: int, glu: bool):
  """x_ref [BM, K]; w refs [K, BN] (one, or two with glu); o_ref [BM, BN]."""
  *w_refs, o_ref = refs
  accs = _tile_products(x_ref, w_refs, (), nk, bk, o_ref.shape)
  o_ref[...] = _epilogue(accs, glu).astype(o_ref.dtype)


def _ragged_kernel(lo_ref, hi_ref, starts_ref, ends_ref, x_ref, *refs, nk: int, bk: int,
                   glu: bool):
  """lo/hi_ref [M / BM] experts of a tile's first/last row; starts/ends_ref [E];
  x_ref [BM, K]; w refs [E, K, BN]; o_ref [BM, BN]."""
  *w_refs, o_ref = refs
  i = pl.program_id(0)
  bm = o_ref.shape[0]
  rows = i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)

  def expert(e, accs):
    parts = _tile_products(x_ref, w_refs, (e,), nk, bk, o_ref.shape)
    mine = ((rows >= starts_ref[e]) & (rows < ends_ref[e]))[:, None]
    return tuple(acc + jnp.where(mine, p, 0.0) for acc, p in zip(accs, parts))

  init = tuple(jnp.zeros(o_ref.shape, jnp.float32) for _ in w_refs)
  accs = jax.lax.fori_loop(lo_ref[i], hi_ref[i] + 1, expert, init)
  o_ref[...] = _epilogue(accs, glu).astype(o_ref.dtype)


def _ragged_tmm_kernel(starts_ref, ends_ref, x_ref, dy_ref, o_ref, *, bm: int):
  """starts/ends_ref [E]; x_ref [M, BK]; dy_ref [M, BN]; o_ref [BK, BN] (expert e)."""
  e = pl.program_id(0)
  start, end = starts_ref[e], ends_ref[e]

  def step(t, acc):
    r0 = pl.multiple_of(t * bm, bm)
    rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
    mine = ((rows >= start) & (rows < end))[:, None]
    x = jnp.where(mine, x_ref[pl.ds(r0, bm), :], 0)
    dy = jnp.where(mine, dy_ref[pl.ds(r0, bm), :], 0)
    return acc + jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(start // bm, (end + bm - 1) // bm, step,
                          jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


# ----------------------------------------------------------------------------------
# pallas_call wrappers (no custom_vjp): pad to tiles, call, slice.
# ----------------------------------------------------------------------------------
def _tiles(m: int, k: int, n: int, tiles) -> tuple[int, int, int]:
  return (_common.tile(m, tiles[0], _MIN_TILE), _common.tile(k, tiles[1], _MIN_TILE),
          _common.tile(n, tiles[2], _MIN_TILE))


def bmm(x, ws, *, glu: bool = False, tiles=TILES, interpret: bool):
  """Batched: x [E, M, K], ws: 1 (or 2 with glu) of [E, K, N] -> [E, M, N] (x.dtype).

  glu=False: x @ w; glu=True: silu(x @ w0) * (x @ w1).
  """
  e, m, k = x.shape
  n = ws[0].shape[-1]
  bm, bk, bn = _tiles(m, k, n, tiles)
  mp, kp, np_ = (_common.round_up(m, bm), _common.round_up(k, bk),
                 _common.round_up(n, bn))
  x = _common.pad_to(_common.pad_to(x, 1, mp), 2, kp)
  ws = [_common.pad_to(_common.pad_to(w, 1, kp), 2, np_) for w in ws]
  out = pl.pallas_call(
      functools.partial(_bmm_kernel, nk=kp // bk, bk=bk, glu=glu),
      grid=(e, mp // bm, np_ // bn),
      in_specs=[pl.BlockSpec((None, bm, kp), lambda g, i, j: (g, i, 0))]
      + [pl.BlockSpec((None, kp, bn), lambda g, i, j: (g, 0, j))] * len(ws),
      out_specs=pl.BlockSpec((None, bm, bn), lambda g, i, j: (g, i, j)),
      out_shape=jax.ShapeDtypeStruct((e, mp, np_), x.dtype),
      interpret=interpret,
      compiler_params=_common.compiler_params(num_warps=4, num_stages=3),
      cost_estimate=_common.matmul_cost(e * mp, kp, np_, x, ws, glu),
      name='grouped_matmul_glu' if glu else 'grouped_matmul',
  )(x, *ws)
  return out[:, :m, :n]


def _group_bounds(group_sizes):
  gs = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(gs).astype(jnp.int32)
  return ends - gs, ends


def ragged_mm(x, ws, group_sizes, *, glu: bool = False, tiles=TILES, interpret: bool):
  """Ragged: x [M, K], ws: 1 (or 2 with glu) of [E, K, N], group_sizes [E] -> [M, N];
  row r uses the expert whose range [start_e, end_e) holds it, rows past the last
  group are zero."""
  m, k = x.shape
  e, _, n = ws[0].shape
  bm, bk, bn = _tiles(m, k, n, tiles)
  mp, kp, np_ = (_common.round_up(m, bm), _common.round_up(k, bk),
                 _common.round_up(n, bn))
  starts, ends = _group_bounds(group_sizes)
  total = ends[-1]
  first = jnp.arange(mp // bm, dtype=jnp.int32) * bm            # first row of each tile
  last = jnp.minimum(first + bm, total) - 1                      # last row in a group
  expert_of = lambda r: jnp.searchsorted(ends, r, side='right').astype(jnp.int32)
  lo = jnp.minimum(expert_of(first), e - 1)
  hi = jnp.where(first < total, expert_of(last), -1).astype(jnp.int32)   # -1: no work
  x = _common.pad_to(_common.pad_to(x, 0, mp), 1, kp)
  ws = [_common.pad_to(_common.pad_to(w, 1, kp), 2, np_) for w in ws]
  whole = lambda a: pl.BlockSpec(a.shape, lambda i, j: (0,) * a.ndim)
  out = pl.pallas_call(
      functools.partial(_ragged_kernel, nk=kp // bk, bk=bk, glu=glu),
      grid=(mp // bm, np_ // bn),
      in_specs=[whole(lo), whole(hi), whole(starts), whole(ends),
                pl.BlockSpec((bm, kp), lambda i, j: (i, 0))]
      + [pl.BlockSpec((e, kp, bn), lambda i, j: (0, 0, j))] * len(ws),
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
      interpret=interpret,
      compiler_params=_common.compiler_params(num_warps=4, num_stages=3),
      cost_estimate=_common.matmul_cost(mp, kp, np_, x, ws, glu),   # row x own expert
      name='ragged_matmul_glu' if glu else 'ragged_matmul',
  )(lo, hi, starts, ends, x, *ws)
  return out[:m, :n]


def ragged_tmm(x, dy, group_sizes, *, tiles=TILES, interpret: bool):
  """Per-expert x_e^T dy_e: x [M, K], dy [M, N], group_sizes [E] -> [E, K, N]."""
  m, k = x.shape
  n = dy.shape[1]
  e = group_sizes.shape[0]
  bm, bk, bn = _tiles(m, k, n, tiles)
  mp, kp, np_ = (_common.round_up(m, bm), _common.round_up(k, bk),
                 _common.round_up(n, bn))
  starts, ends = _group_bounds(group_sizes)
  x = _common.pad_to(_common.pad_to(x, 0, mp), 1, kp)
  dy = _common.pad_to(_common.pad_to(dy, 0, mp), 1, np_)
  whole = pl.BlockSpec((e,), lambda g, i, j: (0,))
  out = pl.pallas_call(
      functools.partial(_ragged_tmm_kernel, bm=bm),
      grid=(e, kp // bk, np_ // bn),
      in_specs=[whole, whole, pl.BlockSpec((mp, bk), lambda g, i, j: (0, i)),
                pl.BlockSpec((mp, bn), lambda g, i, j: (0, j))],
      out_specs=pl.BlockSpec((None, bk, bn), lambda g, i, j: (g, i, j)),
      out_shape=jax.ShapeDtypeStruct((e, kp, np_), x.dtype),
      interpret=interpret,
      compiler_params=_common.compiler_params(num_warps=4, num_stages=3),
      cost_estimate=_common.cost(2 * mp * kp * np_,
                                 _common.nbytes(x, dy) + e * kp * np_ * x.dtype.itemsize),
      name='ragged_transposed_matmul',
  )(starts, ends, x, dy)
  return out[:, :k, :n]


# ----------------------------------------------------------------------------------
# SwiGLU with custom_vjp. `cfg` = (tiles, interpret), static.
# ----------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _swiglu_capacity(rows, wi_0, wi_1, wo, cfg):
  tiles, interpret = cfg
  h = bmm(rows, [wi_0, wi_1], glu=True, tiles=tiles, interpret=interpret)
  return bmm(h, [wo], tiles=tiles, interpret=interpret)


def _swiglu_capacity_fwd(rows, wi_0, wi_1, wo, cfg):
  tiles, interpret = cfg
  mm = functools.partial(bmm, tiles=tiles, interpret=interpret)
  a, b = mm(rows, [wi_0]), mm(rows, [wi_1])
  out = mm(_common.glu(a, b, rows.dtype), [wo])
  return out, (rows, wi_0, wi_1, wo, a, b)


def _swiglu_capacity_bwd(cfg, residuals, dout):
  tiles, interpret = cfg
  rows, wi_0, wi_1, wo, a, b = residuals
  mm = functools.partial(bmm, tiles=tiles, interpret=interpret)
  t = lambda z: jnp.swapaxes(z, 1, 2)
  f = a.shape[-1]
  h = _common.glu(a, b, rows.dtype)
  dout = dout.astype(rows.dtype)
  dh = mm(dout, [t(wo)])                                           # [E, C, F]
  dwo = mm(t(h), [dout])                                           # [E, F, D]
  da, db = _common.glu_backward(dh, a, b, rows.dtype)
  dab = jnp.concatenate([da, db], axis=-1)                         # [E, C, 2F]
  drows = mm(dab, [jnp.concatenate([t(wi_0), t(wi_1)], axis=1)])   # [E, C, D]
  dwi = mm(t(rows), [dab])                                         # [E, D, 2F]
  return (drows, dwi[..., :f].astype(wi_0.dtype), dwi[..., f:].astype(wi_1.dtype),
          dwo.astype(wo.dtype))


_swiglu_capacity.defvjp(_swiglu_capacity_fwd, _swiglu_capacity_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _swiglu_ragged(rows, group_sizes, wi_0, wi_1, wo, cfg):
  tiles, interpret = cfg
  h = ragged_mm(rows, [wi_0, wi_1], group_sizes, glu=True, tiles=tiles,
                interpret=interpret)
  return ragged_mm(h, [wo], group_sizes, tiles=tiles, interpret=interpret)


def _swiglu_ragged_fwd(rows, group_sizes, wi_0, wi_1, wo, cfg):
  tiles, interpret = cfg
  mm = functools.partial(ragged_mm, group_sizes=group_sizes, tiles=tiles,
                         interpret=interpret)
  a, b = mm(rows, [wi_0]), mm(rows, [wi_1])
  out = mm(_common.glu(a, b, rows.dtype), [wo])
  return out, (rows, group_sizes, wi_0, wi_1, wo, a, b)


def _swiglu_ragged_bwd(cfg, residuals, dout):
  tiles, interpret = cfg
  rows, group_sizes, wi_0, wi_1, wo, a, b = residuals
  mm = functools.partial(ragged_mm, group_sizes=group_sizes, tiles=tiles,
                         interpret=interpret)
  tmm = functools.partial(ragged_tmm, group_sizes=group_sizes, tiles=tiles,
                          interpret=interpret)
  t = lambda z: jnp.swapaxes(z, 1, 2)
  f = a.shape[-1]
  h = _common.glu(a, b, rows.dtype)
  dout = dout.astype(rows.dtype)
  dh = mm(dout, [t(wo)])                                           # [R, F]
  dwo = tmm(h, dout)                                               # [E, F, D]
  da, db = _common.glu_backward(dh, a, b, rows.dtype)
  dab = jnp.concatenate([da, db], axis=-1)                         # [R, 2F]
  drows = mm(dab, [jnp.concatenate([t(wi_0), t(wi_1)], axis=1)])   # [R, D]
  dwi = tmm(rows, dab)                                             # [E, D, 2F]
  return (drows, None, dwi[..., :f].astype(wi_0.dtype), dwi[..., f:].astype(wi_1.dtype),
          dwo.astype(wo.dtype))


_swiglu_ragged.defvjp(_swiglu_ragged_fwd, _swiglu_ragged_bwd)


# ----------------------------------------------------------------------------------
# Public ops.
# ----------------------------------------------------------------------------------
def swiglu_capacity(rows, wi_0, wi_1, wo, *, impl: str = 'pallas', tiles=TILES,
                    interpret: bool | None = None):
  """SwiGLU per expert block: rows [E, C, D], wi_* [E, D, F], wo [E, F, D] -> [E, C, D].

  impl: 'pallas' or 'xla' (the reference).
  tiles: (BM, BK, BN), powers of two. Differentiable in rows and weights.
  """
  if impl == 'xla':
    return swiglu_capacity_reference(rows, wi_0, wi_1, wo)
  return _swiglu_capacity(rows, wi_0, wi_1, wo, (tuple(tiles), _common.use_interpret(interpret)))


def swiglu_ragged(rows, group_sizes, wi_0, wi_1, wo, *, impl: str = 'pallas', tiles=None,
                  interpret: bool | None = None,
                  tokamax_implementation=library_matmul.TOKAMAX_GPU):
  """SwiGLU of ragged expert groups: rows [R, D], group_sizes [E] int32 (expert e's rows
  follow expert e-1's), wi_* [E, D, F], wo [E, F, D] -> [R, D] (zero past the groups).

  impl: 'pallas', 'megablox' (TPU's grouped matmul), 'tokamax' (tokamax's GPU grouped
  matmul, `tokamax_implementation` naming its kernels) or 'xla' (the `ragged_dot`
  reference). tiles: (BM, BK, BN) of our kernels (None: TILES), or megablox's
  (TM, TK, TN) (None: chosen for the shapes, pallas_kernels/megablox_tiles.py).
  Differentiable in rows and weights.
  """
  if impl == 'xla':
    return swiglu_ragged_reference(rows, group_sizes, wi_0, wi_1, wo)
  if impl == 'tokamax':
    return library_matmul.swiglu_tokamax(rows, group_sizes, wi_0, wi_1, wo,
                                         tokamax_implementation)
  interpret = _common.use_interpret(interpret)
  if impl == 'megablox':
    return library_matmul.swiglu_megablox(rows, group_sizes, wi_0, wi_1, wo, interpret,
                                          None if tiles is None else tuple(tiles))
  return _swiglu_ragged(rows, group_sizes.astype(jnp.int32), wi_0, wi_1, wo,
                        (tuple(tiles or TILES), interpret))
