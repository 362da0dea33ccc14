"""Expert parallelism's row exchange: only used rows travel, both ways.

Inside `jax.shard_map` over the 'expert' axis (moma_jax/model/expert_parallel.py), each
device holds its routed rows in the ragged layout: expert after expert, expert e's
rows_per_expert[e] rows right after expert e-1's, in S static rows (the routing spec's
bound on the rows its groups can route, `RoutingSpec.ep_send_rows`). Here:
  1. every device learns every other's row counts (an all-gather of [X, E_x] integers);
  2. for each local expert index i, it sends each device t of the expert axis the
     contiguous run of its rows for t's expert i (`ragged_all_to_all`, E_x of them),
     written where the receiver keeps that expert's rows: after its experts below i,
     and after what lower-indexed devices sent for i, so the received rows are in
     expert order as they arrive;
  3. the receiver runs `compute` over them and their counts and sends the results
     back the same way, so they land in the sender's ragged layout, ready for its
     combine. No rows are reordered on either side.
XLA's CPU backend has no ragged all-to-all: there `emulated_ragged_all_to_all` computes
what the collective is documented to compute, from a dense all-to-all of whole runs, so
the program is the same on every platform but for that one collective.

Axis legend: X size of the 'expert' axis, E experts (all), E_x = E / X per device, S
send rows, R received rows (static bound), D embed.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import pallas_kernels
from pallas_kernels import references

from moma_jax.model import mesh as mesh_lib

def _exclusive_cumsum(a, axis=-1):
  return jnp.cumsum(a, axis=axis) - a


def collective() -> Callable:
  """The ragged all-to-all of the platform being traced for: the collective on TPU and
  GPU, its emulation on CPU. Chosen in Python: a `lax.platform_dependent` conditional
  holding collectives deadlocks XLA's CPU runtime (moma_jax/model/kernels.py)."""
  if pallas_kernels.backend() in ('gpu', 'tpu'):
    return jax.lax.ragged_all_to_all
  return emulated_ragged_all_to_all


def _zeros_varying_like(like, num_rows: int, dtype):
  """[num_rows, D] zeros typed as varying over the mesh axes `like` varies over: the
  exchange chains its collectives through their output operand, whose type the
  result takes."""
  zeros = jnp.zeros((num_rows, like.shape[1]), dtype)
  axes = tuple(sorted(jax.typeof(like).manual_axis_type.varying))
  return jax.lax.pcast(zeros, axes, to='varying') if axes else zeros


def _runs(every):
  """From every[s, t, i] (rows source s sends local expert i of device t, [X, X, E_x]):
  start[s, t, i], where those rows begin in source s's ragged layout, and lands[s, t,
  i], where they land on device t: after t's experts below i, and after what lower
  sources sent for i."""
  x_size, _, e_x = every.shape
  start = _exclusive_cumsum(every.reshape(x_size, x_size * e_x), 1).reshape(every.shape)
  first = _exclusive_cumsum(every.sum(0), 1)                              # [X dst, E_x]
  return start, first[None] + _exclusive_cumsum(every, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _move(rows, every, num_rows: int, other_rows: int, to_experts: bool, send: Callable):
  """Rows to their experts' devices (to_experts) or back: [S, D] -> [R, D] or
  [R, D] -> [S, D], `num_rows` out, one collective per local expert index. The two
  directions are each other's transpose (the same rows moved the other way), so each
  is the other's gradient. Written out because JAX's own differentiation through the
  output operand, which the chain passes through, types the result as invariant over
  the mesh axes (jax 0.10 to 0.12), and costs a mask and a sum per collective."""
  del other_rows
  return _sent(rows, every, rows, num_rows, to_experts, send)


def _sent(rows, every, like, num_rows: int, to_experts: bool, send: Callable):
  """_move's rows, in [num_rows, D] typed as varying like `like`."""
  e_x = every.shape[-1]
  me = jax.lax.axis_index(mesh_lib.EXPERT)
  start, lands = _runs(every)
  out = _zeros_varying_like(like, num_rows, rows.dtype)
  for i in range(e_x):
    if to_experts:
      out = send(rows, out, start[me, :, i], every[me, :, i], lands[me, :, i],
                 every[:, me, i], axis_name=mesh_lib.EXPERT)
    else:
      out = send(rows, out, lands[:, me, i], every[:, me, i], start[:, me, i],
                 every[me, :, i], axis_name=mesh_lib.EXPERT)
  return out


def _move_fwd(rows, every, num_rows, other_rows, to_experts, send):
  # rows[:0] keeps the input's mesh-axis type, which its gradient must have, for free.
  return _move(rows, every, num_rows, other_rows, to_experts, send), (every, rows[:0])


def _move_bwd(num_rows, other_rows, to_experts, send, residuals, ct):
  every, like = residuals
  return _sent(ct, every, like, other_rows, not to_experts, send), None


_move.defvjp(_move_fwd, _move_bwd)


def exchange(rows, rows_per_expert, *, x_size: int, received_rows: int, compute: Callable):
  """rows [S, D] in the ragged layout, rows_per_expert [E] (rows per expert) -> the rows
  `compute` returned for them, [S, D] in the same layout (0 past sum(rows_per_expert)).

  compute(rows [R, D] expert-major, sizes [E_x]) -> [R, D]. R: received_rows, a bound
  on the rows one device's experts receive. The collective is `collective()`'s.
  """
  send = collective()
  s_rows = rows.shape[0]
  e_x = rows_per_expert.shape[0] // x_size
  me = jax.lax.axis_index(mesh_lib.EXPERT)
  # every[s, t, i]: rows source s sends local expert i of device t.
  every = jax.lax.all_gather(rows_per_expert.astype(jnp.int32).reshape(x_size, e_x),
                             mesh_lib.EXPERT)                                 # [X, X, E_x]
  got = _move(rows, every, received_rows, s_rows, True, send)             # [R, D]
  out = compute(got, every[:, me].sum(0))                                 # [R, D]
  return _move(out, every, s_rows, received_rows, False, send)            # [S, D]


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """`jax.lax.ragged_all_to_all`'s documented result, from a dense all-to-all (for
  CPUs, which lack the collective): device t receives from every device s the run
  operand_s[input_offsets_s[t] : + send_sizes_s[t]] at output[output_offsets_s[t] :].
  Each run travels in a slot as long as the whole operand."""
  x, s_rows = input_offsets.shape[0], operand.shape[0]
  k = jnp.arange(s_rows)
  index = jnp.where(k < send_sizes[:, None], input_offsets[:, None] + k, s_rows)  # [X, S]
  slots = references.gather_rows_reference(operand, index.reshape(-1))
  got = jax.lax.all_to_all(slots.reshape(x, s_rows, -1), axis_name, 0, 0)      # [X, S, D]
  # Where each source's run starts here: its output_offsets[me].
  starts = jax.lax.all_to_all(output_offsets.reshape(x, 1), axis_name, 0, 0)[:, 0]
  r = output.shape[0]
  where = jnp.where(k < recv_sizes[:, None], starts[:, None] + k, r)           # [X, S]
  return jnp.concatenate([output, output[:1]]).at[where.reshape(-1)].set(
      got.reshape(x * s_rows, -1))[:r]
