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

Kernel design (`row_kernels.combine_pallas`): grid (T / BT, D / BD); a program loops
over the S columns of its [BT, S] block of the inverse map (S is small and static: unrolled), and
for each gathers a [BT, BD] tile of `out` rows and the BT weights with vector-indexed
loads (absent rows clamped to row 0 and zeroed by a select), accumulating
weight * out in float32; one store at the end. T and D are padded to tile multiples.
TPU: no vector-indexed VMEM loads in Mosaic, so the model takes `impl='xla'` there.

Gradient (`jax.custom_vjp`; backward uses the Pallas dispatch gather, the rest jnp):
  d_out[r] = weight[r] * dy[token_index[r]],  d_weight[r] = <out[r], dy[token_index[r]]>,
both zero for rows that add nothing.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import row_kernels

ROW_TILE, COL_TILE = row_kernels.ROW_TILE, row_kernels.COL_TILE


def combine_rows_reference(out: jax.Array, weight: jax.Array, token_index: jax.Array,
                           num_tokens: int) -> jax.Array:
  """jnp reference: y [T, D] from out [R, D], weight [R], token_index [R]."""
  contrib = out * weight[:, None].astype(out.dtype)
  return jnp.zeros((num_tokens, out.shape[-1]), out.dtype).at[token_index].add(
      contrib, mode='drop')


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _combine(out, weight, token_index, num_tokens, rows_per_token, interpret, tiles):
  rows, _ = row_kernels.rows_of_token(token_index, num_tokens, rows_per_token)
  return row_kernels.combine_pallas(out, weight, rows, interpret=interpret,
                                    row_tile=tiles[0], col_tile=tiles[1])


def _combine_fwd(out, weight, token_index, num_tokens, rows_per_token, interpret, tiles):
  rows, included = row_kernels.rows_of_token(token_index, num_tokens, rows_per_token)
  y = row_kernels.combine_pallas(out, weight, rows, interpret=interpret,
                                 row_tile=tiles[0], col_tile=tiles[1])
  return y, (out, weight, token_index, included)


def _combine_bwd(num_tokens, rows_per_token, interpret, tiles, residuals, dy):
  del rows_per_token
  out, weight, token_index, included = residuals
  # Rows that added nothing read the absent index, so their gathered cotangent is zero.
  index = jnp.where(included, token_index, num_tokens)
  g = row_kernels.gather_pallas(dy, index, interpret=interpret, row_tile=tiles[0],
                                col_tile=tiles[1]).astype(jnp.float32)     # [R, D]
  d_out = (weight[:, None].astype(jnp.float32) * g).astype(out.dtype)
  d_weight = jnp.sum(out.astype(jnp.float32) * g, axis=-1).astype(weight.dtype)
  return d_out, d_weight, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def combine_rows(out: jax.Array, weight: jax.Array, token_index: jax.Array,
                 num_tokens: int, rows_per_token: int, *, impl: str = 'pallas',
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
    impl: 'pallas' or 'xla' (the reference).
    interpret: None = interpret mode on CPU, compiled on GPU.
    tiles: (BT tokens, BD columns) per program, powers of two.
  """
  if impl == 'xla':
    return combine_rows_reference(out, weight, token_index, num_tokens)
  return _combine(out, weight, token_index.astype(jnp.int32), int(num_tokens),
                  int(rows_per_token), _common.use_interpret(interpret), tuple(tiles))
