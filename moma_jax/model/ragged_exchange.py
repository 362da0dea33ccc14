"""Expert parallelism's row exchange with `jax.lax.ragged_all_to_all`: only used rows travel.

Inside `jax.shard_map` over the 'expert' axis (moma_jax/model/expert_parallel.py), each
device holds its routed rows in the 'buffer' layout: expert e's rows are the first
group_sizes[e] of its C buffer rows. Here:
  1. every device learns every other's row counts (an all-gather of [X, E_x] integers);
  2. it packs its used rows, expert after expert, and sends each device of the expert
     axis the contiguous run for that device's experts (`ragged_all_to_all`), written
     where the receiver expects it: after what lower-indexed devices sent it;
  3. the receiver reorders what it got (source after source) into expert order, runs
     `compute` over the rows and their counts, and sends the results back the same way;
  4. the sender puts them back into its buffer layout, for the combine.
XLA's CPU backend has no ragged all-to-all: there the dense exchange of whole buffers
runs instead, and the tests drive this path on CPU with `emulated_ragged_all_to_all`,
which computes what the collective is documented to compute.

Axis legend: X size of the 'expert' axis, E experts (all), E_x = E / X per device, C
buffer rows per expert, S = E * C send rows, R received rows (static bound), D embed.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from pallas_kernels import references

EXPERT_AXIS = 'expert'


def _exclusive_cumsum(a, axis=-1):
  return jnp.cumsum(a, axis=axis) - a


def received_order(counts, capacity: int, received_rows: int):
  """Where each received buffer row goes in the expert-major received rows.

  counts [X src, E_x]: rows source s sent expert e (its buffer's first counts[s, e] of
  C rows). Returns dest [X, E_x, C] (row index in [0, R), R for empty buffer rows) and
  sizes [E_x], the rows of each expert: expert e's rows follow expert e-1's, source by
  source.
  """
  sizes = counts.sum(0).astype(jnp.int32)                                 # [E_x]
  j = jnp.arange(capacity)
  dest = (_exclusive_cumsum(sizes)[None, :, None] + _exclusive_cumsum(counts, 0)[..., None]
          + j)                                                            # [X, E_x, C]
  return jnp.where(j < counts[..., None], dest, received_rows), sizes


def exchange(rows, group_sizes, *, x_size: int, received_rows: int,
             compute: Callable, collective: Callable = jax.lax.ragged_all_to_all):
  """rows [S, D] in the buffer layout, group_sizes [E] (used rows per expert) ->
  the rows `compute` returned for them, [S, D] in the same layout (0 for unused rows).

  compute(rows [R, D] expert-major, sizes [E_x]) -> [R, D]; collective: the ragged
  all-to-all (or its emulation). R: received_rows, a bound on the rows one device's
  experts receive.
  """
  s_rows, d = rows.shape
  e = group_sizes.shape[0]
  e_x, capacity = e // x_size, s_rows // e
  me = jax.lax.axis_index(EXPERT_AXIS)
  gs = group_sizes.astype(jnp.int32)
  # every[s, t, i]: rows source s sends local expert i of device t.
  every = jax.lax.all_gather(gs.reshape(x_size, e_x), EXPERT_AXIS)       # [X, X, E_x]
  per_pair = every.sum(-1)                                                # [X src, X dst]

  # Send: used rows packed expert after expert; device t's experts form one run.
  j = jnp.arange(capacity)
  start = _exclusive_cumsum(gs)                                           # [E]
  send_pos = jnp.where(j < gs[:, None], start[:, None] + j, s_rows).reshape(-1)  # [S]
  packed = jnp.zeros((s_rows + 1, d), rows.dtype).at[send_pos].set(rows)[:s_rows]
  send_offsets = start.reshape(x_size, e_x)[:, 0]
  send_sizes = per_pair[me]
  recv_sizes = per_pair[:, me]
  # Where this device's run lands on device t: after the runs of devices below it.
  out_offsets = _exclusive_cumsum(per_pair, 0)[me]
  got = collective(packed, jnp.zeros((received_rows, d), rows.dtype), send_offsets,
                   send_sizes, out_offsets, recv_sizes, axis_name=EXPERT_AXIS)

  # Received source after source; compute wants expert after expert.
  counts = every[:, me]                                                   # [X, E_x]
  dest, sizes = received_order(counts, capacity, received_rows)           # [X, E_x, C]
  recv_start = _exclusive_cumsum(recv_sizes)                              # [X]
  src = recv_start[:, None, None] + _exclusive_cumsum(counts, 1)[..., None] + j
  valid = dest < received_rows
  src = jnp.where(valid, src, received_rows)
  to_expert = jnp.full((received_rows + 1,), received_rows, jnp.int32).at[
      dest.reshape(-1)].set(src.reshape(-1))[:received_rows]
  to_source = jnp.full((received_rows + 1,), received_rows, jnp.int32).at[
      src.reshape(-1)].set(dest.reshape(-1))[:received_rows]
  take = references.gather_rows_reference      # index R (or S): a zero row
  out = compute(take(got, to_expert), sizes)                              # [R, D]

  # Back: each source's results to where its rows came from in its packed send rows.
  back_offsets = _exclusive_cumsum(per_pair, 1)[:, me]
  returned = collective(take(out, to_source), jnp.zeros((s_rows, d), out.dtype),
                        recv_start, recv_sizes, back_offsets, send_sizes,
                        axis_name=EXPERT_AXIS)
  return take(returned, send_pos)                                         # [S, D]


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """`jax.lax.ragged_all_to_all`'s documented result, from an all-gather (for CPUs,
  which lack the collective): device t receives from every device s the run
  operand_s[input_offsets_s[t] : + send_sizes_s[t]] at output[output_offsets_s[t] :]."""
  del recv_sizes
  me = jax.lax.axis_index(axis_name)
  operands = jax.lax.all_gather(operand, axis_name)                       # [X, S, D]
  starts, sizes, dests = (jax.lax.all_gather(a, axis_name)[:, me]
                          for a in (input_offsets, send_sizes, output_offsets))  # [X]
  k = jnp.arange(output.shape[0])
  for s in range(operands.shape[0]):
    inside = (k >= dests[s]) & (k < dests[s] + sizes[s])
    rows = jnp.take(operands[s], jnp.clip(starts[s] + k - dests[s], 0,
                                          operand.shape[0] - 1), axis=0)
    output = jnp.where(inside[:, None], rows, output)
  return output
