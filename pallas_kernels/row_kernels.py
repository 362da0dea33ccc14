"""The raw row kernels, without gradients: gather rows; gather-sum over an inverse map.

  gather_pallas(x, token_index)          rows [R, D] = x[token_index], zeros where absent
  combine_pallas(out, weight, rows)      y [T, D] = sum_s weight * out[rows[:, s]]
  rows_of_token(token_index, T, S)       the inverse map rows [T, S] the combine reads

dispatch.py and combine.py wrap them in `jax.custom_vjp`s, each one's backward being the
other's kernel (the transpose of a gather is a scatter-add, done here as a gather-sum
over the inverse map); their docstrings give the kernel designs. Kept apart so that the
two modules need not import each other.

Axis legend: T tokens (all groups, flat), R rows, D embed, S rows per token (at most).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common

ROW_TILE, COL_TILE = 32, 128


def _gather_kernel(index_ref, x_ref, rows_ref, *, num_tokens: int):
  """index_ref [BR] int32; x_ref [T, BD]; rows_ref [BR, BD]."""
  index, present = _common.normalize_index(index_ref[...], num_tokens)
  tile = x_ref[jnp.where(present, index, 0), :]
  rows_ref[...] = jnp.where(present[:, None], tile, 0).astype(rows_ref.dtype)


def gather_pallas(x: jax.Array, token_index: jax.Array, *, interpret: bool,
                  row_tile: int = ROW_TILE, col_tile: int = COL_TILE) -> jax.Array:
  """The raw kernel (no custom_vjp): rows [R, D] = x[token_index]."""
  t, d = x.shape
  r = token_index.shape[0]
  br, bd = _common.tile(r, row_tile), _common.tile(d, col_tile)
  r_pad, d_pad = _common.round_up(r, br), _common.round_up(d, bd)
  index = _common.pad_to(token_index.astype(jnp.int32), 0, r_pad, value=t)
  xp = _common.pad_to(x, 1, d_pad)
  rows = pl.pallas_call(
      functools.partial(_gather_kernel, num_tokens=t),
      grid=(r_pad // br, d_pad // bd),
      in_specs=[pl.BlockSpec((br,), lambda i, j: (i,)),
                pl.BlockSpec((t, bd), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((br, bd), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((r_pad, d_pad), x.dtype),
      interpret=interpret,
      compiler_params=_common.compiler_params(num_warps=4),
      cost_estimate=_common.cost(  # a copy: rows read once, written once
          0, _common.nbytes(index) + 2 * r_pad * d_pad * x.dtype.itemsize),
      name='dispatch_gather_rows',
  )(index, xp)
  return rows[:r, :d]


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
