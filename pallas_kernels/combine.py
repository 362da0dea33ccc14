"""Combine: y[t] = sum over rows r with token_index[r] = t of weight[r] * out[r].

Axis legend: T tokens (all groups, flat), R rows, D embed, S rows per token (at most).

`combine_rows(out, weight, token_index, num_tokens, rows_per_token)` equals
`moma_jax.model.routing.combine_rows` (a scatter-add, `.at[token_index].add(weight *
out, mode='drop')`) up to the order of the additions: rows whose index is outside
[-T, T) (the dump index T) add nothing; [-T, 0) wraps as in numpy.

A scatter-add does not suit Pallas (programs would race on output rows), so the kernel
is a gather over the inverse map `rows_of_token` [T, S]: the rows holding token t, in
row order, -1 for none. S (static) must bound the rows of any token — for expert
choice the number of experts that can take a token (each expert takes a token at most
once); rows past S of a token are left out (`rows_of_token` reports which rows made it,
and the backward gives the others zero gradient, so value and gradient agree).

Kernel design (`_combine_kernel`): grid (T / BT, D / BD); a program loops over the S
columns of its [BT, S] block of the inverse map (S is small and static: unrolled), and
for each gathers a [BT, BD] tile of `out` rows and the BT weights with vector-indexed
loads (absent rows clamped to row 0 and zeroed by a select), accumulating
weight * out in float32; one store at the end. T and D are padded to tile multiples.
TPU: no vector-indexed VMEM loads in Mosaic, so `impl='auto'` is XLA there.

Gradient (`jax.custom_vjp`; backward uses the Pallas dispatch gather, the rest jnp):
  d_out[r] = weight[r] * dy[token_index[r]],  d_weight[r] = <out[r], dy[token_index[r]]>,
both zero for rows that add nothing.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common
from pallas_kernels import dispatch

ROW_TILE, COL_TILE = 32, 128


def combine_rows_reference(out: jax.Array, weight: jax.Array, token_index: jax.Array,
                           num_tokens: int) -> jax.Array:
  """jnp reference: y [T, D] from out [R, D], weight [R], token_index [R]."""
  contrib = out * weight[:, None].astype(out.dtype)
  return jnp.zeros((num_tokens, out.shape[-1]), out.dtype).at[token_index].add(
      contrib, mode='drop')


def rows_of_token(token_index: jax.Array, num_tokens: int, rows_per_token: int):
  """The inverse of token_index, by a stable sort (jnp).

  Args:
    token_index: [R] int32.
    num_tokens: T.
    rows_per_token: static S.
  Returns:
    rows [T, S] int32: rows holding token t in increasing row order, -1 padding;
    included [R] bool: row r is present and among the first S rows of its token.
  """
  r = token_index.shape[0]
  index, present = _common.normalize_index(token_index.astype(jnp.int32), num_tokens)
  key = jnp.where(present, index, num_tokens)                     # absent rows sort last
  order = jnp.argsort(key, stable=True).astype(jnp.int32)         # [R] rows by token
  count = jnp.zeros((num_tokens + 1,), jnp.int32).at[key].add(1)
  start = jnp.cumsum(count) - count                                # [T+1] first slot
  slot = jnp.arange(rows_per_token, dtype=jnp.int32)
  where = start[:num_tokens, None] + slot                          # [T, S]
  rows = jnp.where(slot < count[:num_tokens, None],
                   order[jnp.clip(where, 0, max(r - 1, 0))], -1)
  rank = jnp.zeros((r,), jnp.int32).at[order].set(
      jnp.arange(r, dtype=jnp.int32) - start[key[order]])          # [R] slot of each row
  return rows.astype(jnp.int32), present & (rank < rows_per_token)


def _combine_kernel(*refs, num_slots: int, weighted: bool):
  """refs: rows_ref [BT, S] int32, (weight_ref [R] if weighted), out_ref [R, BD],
  y_ref [BT, BD]."""
  if weighted:
    rows_ref, weight_ref, out_ref, y_ref = refs
  else:
    (rows_ref, out_ref, y_ref), weight_ref = refs, None
  acc = jnp.zeros(y_ref.shape, jnp.float32)
  for s in range(num_slots):                   # S is a handful: unrolled
    row = rows_ref[:, s]                       # [BT]
    present = row >= 0
    row = jnp.where(present, row, 0)
    value = out_ref[row, :].astype(jnp.float32)
    if weight_ref is not None:
      value = weight_ref[row].astype(jnp.float32)[:, None] * value
    acc = acc + jnp.where(present[:, None], value, 0.0)
  y_ref[...] = acc.astype(y_ref.dtype)


def combine_pallas(out: jax.Array, weight: jax.Array | None, rows: jax.Array, *,
                   interpret: bool, row_tile: int = ROW_TILE,
                   col_tile: int = COL_TILE) -> jax.Array:
  """The raw kernel (no custom_vjp): y [T, D] from out [R, D], weight [R] (None: ones),
  rows [T, S] (-1 padding)."""
  r, d = out.shape
  t, s = rows.shape
  bt, bd = _common.tile(t, row_tile), _common.tile(d, col_tile)
  t_pad, d_pad = _common.round_up(t, bt), _common.round_up(d, bd)
  rows_p = _common.pad_to(rows, 0, t_pad, value=-1)
  out_p = _common.pad_to(out, 1, d_pad)
  args = [rows_p, out_p]
  in_specs = [pl.BlockSpec((bt, s), lambda i, j: (i, 0)),
              pl.BlockSpec((r, bd), lambda i, j: (0, j))]
  if weight is not None:
    args.insert(1, weight)
    in_specs.insert(1, pl.BlockSpec((r,), lambda i, j: (0,)))
  y = pl.pallas_call(
      functools.partial(_combine_kernel, num_slots=s, weighted=weight is not None),
      grid=(t_pad // bt, d_pad // bd),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bt, bd), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((t_pad, d_pad), out.dtype),
      interpret=interpret,
      compiler_params=_common.compiler_params(num_warps=4),
      # Per token and slot: a multiply (weighted) and an add per column.
      cost_estimate=_common.cost(
          (2 if weight is not None else 1) * t_pad * s * d_pad,
          _common.nbytes(*args) + t_pad * d_pad * out.dtype.itemsize),
      name='combine_rows',
  )(*args)
  return y[:t, :d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _combine(out, weight, token_index, num_tokens, rows_per_token, interpret, tiles):
  rows, _ = rows_of_token(token_index, num_tokens, rows_per_token)
  return combine_pallas(out, weight, rows, interpret=interpret, row_tile=tiles[0],
                        col_tile=tiles[1])


def _combine_fwd(out, weight, token_index, num_tokens, rows_per_token, interpret, tiles):
  rows, included = rows_of_token(token_index, num_tokens, rows_per_token)
  y = combine_pallas(out, weight, rows, interpret=interpret, row_tile=tiles[0],
                     col_tile=tiles[1])
  return y, (out, weight, token_index, included)


def _combine_bwd(num_tokens, rows_per_token, interpret, tiles, residuals, dy):
  del rows_per_token
  out, weight, token_index, included = residuals
  # Rows that added nothing read the absent index, so their gathered cotangent is zero.
  index = jnp.where(included, token_index, num_tokens)
  g = dispatch.gather_pallas(dy, index, interpret=interpret, row_tile=tiles[0],
                             col_tile=tiles[1]).astype(jnp.float32)        # [R, D]
  d_out = (weight[:, None].astype(jnp.float32) * g).astype(out.dtype)
  d_weight = jnp.sum(out.astype(jnp.float32) * g, axis=-1).astype(weight.dtype)
  return d_out, d_weight, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def combine_rows(out: jax.Array, weight: jax.Array, token_index: jax.Array,
                 num_tokens: int, rows_per_token: int, *, impl: str = 'auto',
                 interpret: bool | None = None,
                 tiles: tuple[int, int] = (ROW_TILE, COL_TILE)) -> jax.Array:
  """y [T, D] = sum_{r: token_index[r] = t} weight[r] * out[r]; differentiable in out
  and weight.

  Args:
    out: [R, D] expert outputs.
    weight: [R] gates (0 for unused rows).
    token_index: [R] int32 (T for unused rows).
    num_tokens: static T.
    rows_per_token: static S >= the rows any token has (e.g. the number of experts).
    impl: 'pallas', 'xla' (the reference) or 'auto' (xla on TPU, else pallas).
    interpret: None = interpret mode on CPU, compiled on GPU.
    tiles: (BT tokens, BD columns) per program, powers of two.
  """
  if impl == 'auto':
    impl = 'xla' if _common.backend() == 'tpu' else 'pallas'
  if impl == 'xla':
    return combine_rows_reference(out, weight, token_index, num_tokens)
  return _combine(out, weight, token_index.astype(jnp.int32), int(num_tokens),
                  int(rows_per_token), _common.use_interpret(interpret), tuple(tiles))
