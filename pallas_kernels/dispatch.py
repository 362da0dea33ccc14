"""Dispatch: gather the routed rows, rows = x[token_index], absent tokens as zero rows.

Axis legend: T tokens (all groups, flat), R rows, D embed, S rows per token (at most).

`gather_rows(x, token_index)` equals `gather_rows_reference` below,
`jnp.take(x, token_index, axis=0, mode='fill', fill_value=0)`: an index in [0, T) reads
that token, one in [-T, 0) wraps as in numpy, anything else (the routing plan's dump
index T) gives a zero row.

Kernel design (`row_kernels.gather_pallas`): grid (R / BR, D / BD); a program loads its
BR token indices, clamps absent ones to row 0 (so every load is in bounds) and gathers a
[BR, BD] tile of x with one vector-indexed load, then zeroes the absent rows with a
select (not a multiply, so a NaN in row 0 cannot leak into a zero row). x is seen as a
[T, BD] column strip per program (the full T axis). R and D are padded to tile
multiples (padding rows carry the absent index T and are sliced off).
TPU: Mosaic has no vector-indexed loads from VMEM, so on TPU `gather_rows` uses the
XLA gather (`impl='xla'`); the kernel is for GPU (Triton) and interpret mode.

Gradient (`jax.custom_vjp`): the scatter-add of the row cotangents into x. With
`rows_per_token` (static S, the most rows one token can have — the number of experts
that can take a token) it runs the Pallas combine kernel with unit weights (a gather
over the inverse map, see `combine.py`); without it, XLA's scatter-add
(`.at[].add(mode='drop')`, the reference's own transpose).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import row_kernels

ROW_TILE, COL_TILE = row_kernels.ROW_TILE, row_kernels.COL_TILE


def gather_rows_reference(x: jax.Array, token_index: jax.Array) -> jax.Array:
  """jnp reference: rows [R, D] = x[token_index] for x [T, D], zeros where absent."""
  return jnp.take(x, token_index, axis=0, mode='fill', fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _gather(x, token_index, rows_per_token, interpret, tiles):
  return row_kernels.gather_pallas(x, token_index, interpret=interpret,
                                   row_tile=tiles[0], col_tile=tiles[1])


def _gather_fwd(x, token_index, rows_per_token, interpret, tiles):
  return _gather(x, token_index, rows_per_token, interpret, tiles), (token_index, x.shape)


def _gather_bwd(rows_per_token, interpret, tiles, residuals, d_rows):
  token_index, (t, d) = residuals
  if rows_per_token is None:
    dx = jnp.zeros((t, d), d_rows.dtype).at[token_index].add(d_rows, mode='drop')
  else:
    rows_of_token, _ = row_kernels.rows_of_token(token_index, t, rows_per_token)
    dx = row_kernels.combine_pallas(d_rows, None, rows_of_token, interpret=interpret,
                                    row_tile=tiles[0], col_tile=tiles[1])
  return dx, None


_gather.defvjp(_gather_fwd, _gather_bwd)


def gather_rows(x: jax.Array, token_index: jax.Array, *, rows_per_token: int | None = None,
                impl: str = 'pallas', interpret: bool | None = None,
                tiles: tuple[int, int] = (ROW_TILE, COL_TILE)) -> jax.Array:
  """rows [R, D] = x[token_index] (zero rows for absent tokens), differentiable in x.

  Args:
    x: [T, D] tokens.
    token_index: [R] int32, T (or any out-of-range index) for an unused row.
    rows_per_token: static S >= the rows any token has; enables the Pallas backward.
    impl: 'pallas' or 'xla' (the reference).
    interpret: None = interpret mode on CPU, compiled on GPU.
    tiles: (BR rows, BD columns) per program, powers of two.
  """
  if impl == 'xla':
    return gather_rows_reference(x, token_index)
  return _gather(x, token_index.astype(jnp.int32), rows_per_token,
                 _common.use_interpret(interpret), tuple(tiles))
