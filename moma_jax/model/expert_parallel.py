"""Expert parallelism: routed rows travel to their expert's device and back.

Under a mesh (`jax.set_mesh`) of the axes ('data', 'fsdp', 'expert', 'tensor'), the
routing groups are split over the batch axes ('data', 'fsdp', 'expert') and the stacked
expert weights over 'expert'. Routing decisions are made per group before this module
runs, so they do not depend on the mesh. Here, inside `jax.shard_map`, every device
  1. packs the rows its groups send to each expert into one buffer of C rows per expert
     (the 'buffer' layout of `routing.pack`; rows past C are cut and counted as dropped),
  2. exchanges the row counts per expert, then the rows, over 'expert', so that each
     device holds, for each of its own experts, the rows every device of its expert row
     sent: on TPU and GPU only the used rows (`jax.lax.ragged_all_to_all`,
     moma_jax/model/ragged_exchange.py), on CPU, which lacks that collective, the whole
     buffers (`jax.lax.all_to_all`),
  3. lines up the rows actually received, expert after expert (R_recv static rows,
     `RoutingSpec.ep_received_rows`: for expert choice about half the buffers' rows at
     4t4i), runs its experts on them with the ragged grouped matmul of `model.kernels`
     (no work for empty buffer rows), sends the results back the same way and adds
     them, weighted by their gates, to the tokens they came from.
With an `expert` axis of size 1 no rows cross devices: each device runs the
single-device path (`routing.layout`) on its own groups.

C, `buffer_rows`: with `routing.ep_capacity_factor = None` (exact) every row a shard's
groups can ask for, so results equal the single-device ones; with a factor f,
ceil(f * rows an expert expects from the shard), which costs less memory and traffic
and may cut rows.

Axis legend: G routing groups on this device, N tokens per group, D embed, E experts
(all groups, stacked order), X size of the 'expert' axis, E_x = E / X experts per
device, K candidate slots per expert, C buffer rows per expert and device, F hidden.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import pallas_kernels
from pallas_kernels import references

from moma_jax.model import kernels
from moma_jax.model import ragged_exchange
from moma_jax.model import routing

BATCH_AXES = ('data', 'fsdp', 'expert')   # mesh axes that split the batch
EXPERT_AXIS = ragged_exchange.EXPERT_AXIS
# The ragged exchange on every platform, through this collective: the tests set them to
# run it on CPU with `ragged_exchange.emulated_ragged_all_to_all`.
RAGGED_EVERYWHERE = [False]
RAGGED_COLLECTIVE = [jax.lax.ragged_all_to_all]


def is_sharded() -> bool:
  """Whether the computation is being traced under a mesh of more than one device."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh.size > 1


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh's axes that split the batch, outermost first."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_shards(mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def routed_ffn(x, selection: routing.Selection, weights, *, local_ffn: Callable,
               buffer_rows: Callable[[int], int], received_rows: Callable[[int, int], int],
               rows_per_token: int, ops: kernels.Ops = kernels.XLA):
  """The expert FFN of all routing groups, under the current mesh.

  x [G_all, N, D]; selection [G_all, E, K] in stacked order (all groups, split over
  the batch axes); weights (wi_0, wi_1 [E, D, F], wo [E, F, D]).
  local_ffn(x, selection, weights) -> (y, kept, plan): the single-device path.
  buffer_rows(groups_per_device) -> C; received_rows(groups_per_device, X*E_x*C) ->
  R_recv. rows_per_token: the most rows one token occupies.
  ops: the gather, batched SwiGLU and combine to use (`model.kernels`).
  Returns y [G_all, N, D] and kept [G_all, E].
  """
  mesh = jax.sharding.get_abstract_mesh()
  spec = P(batch_axes(mesh))
  shards = batch_shards(mesh)
  if x.shape[0] % shards:
    raise ValueError(f'{x.shape[0]} routing groups do not split over {shards} batch shards')
  x_size = mesh.shape.get(EXPERT_AXIS, 1)
  if x_size == 1:
    def body(x, selection, *w):
      y, kept, _ = local_ffn(x, selection, w)
      return y, kept
    w_spec = P()
  else:
    local_groups = x.shape[0] // shards
    capacity = buffer_rows(local_groups)
    received = received_rows(local_groups, selection.idx.shape[1] * capacity)

    def body(x, selection, *w):
      return exchange(x, selection, w, capacity=capacity, x_size=x_size,
                      rows_per_token=rows_per_token, received_rows=received, ops=ops)
    w_spec = P(EXPERT_AXIS)
  # pallas_call outputs carry no varying-axes annotation, which the check needs.
  return jax.shard_map(body, in_specs=(spec, spec) + (w_spec,) * 3, out_specs=(spec, spec),
                       check_vma=not ops.pallas)(x, selection, *weights)


def exchange(x, selection: routing.Selection, weights, *, capacity: int, x_size: int,
             rows_per_token: int, received_rows: int, ops: kernels.Ops = kernels.XLA):
  """One device's part of the expert-parallel FFN (inside shard_map).

  x [G, N, D]; selection [G, E, K]; weights: this device's experts, wi_* [E_x, D, F],
  wo [E_x, F, D]; rows_per_token: the most rows one token occupies; received_rows:
  R_recv, a static bound on the rows this device's experts receive (at most X*E_x*C).
  Returns y [G, N, D] and kept [G, E].
  """
  g, n, d = x.shape
  e = selection.idx.shape[1]
  e_x = e // x_size
  plan = routing.pack(selection, num_tokens=n, layout='buffer', capacity=capacity,
                      rows_per_token=rows_per_token)
  rows = plan.dispatch(x.reshape(g * n, d), ops)                        # [E*C, D]

  def compute(rows_in, sizes):
    return ops.swiglu_ragged(rows_in, sizes, *weights)

  def dense(rows, group_sizes):
    """Whole buffers both ways (`jax.lax.all_to_all`); CPUs have nothing else."""
    # Expert e lives on device e // E_x of the expert axis: [E*C, D] -> [X, E_x*C, D].
    got = jax.lax.all_to_all(rows.reshape(x_size, e_x * capacity, d), EXPERT_AXIS, 0, 0)
    # Each source's row counts per expert travel first: [E] -> [X src, E_x].
    counts = jax.lax.all_to_all(group_sizes.reshape(x_size, e_x), EXPERT_AXIS, 0, 0)
    dest, sizes = ragged_exchange.received_order(counts, capacity, received_rows)
    # The rows actually received, expert after expert: a grouped matmul over their
    # counts computes nothing for the buffers' empty rows.
    flat = got.reshape(x_size * e_x * capacity, d)
    rows_in = jnp.zeros((received_rows + 1, d), flat.dtype).at[dest.reshape(-1)].set(
        flat)[:received_rows]
    out = compute(rows_in, sizes)                                       # [R_recv, D]
    back = references.gather_rows_reference(out, dest.reshape(-1))
    back = back.reshape(x_size, e_x * capacity, d)                      # [X, E_x*C, D]
    return jax.lax.all_to_all(back, EXPERT_AXIS, 0, 0).reshape(e * capacity, d)

  def ragged(rows, group_sizes):
    """Only the used rows, both ways (`jax.lax.ragged_all_to_all`)."""
    return ragged_exchange.exchange(rows, group_sizes, x_size=x_size,
                                    received_rows=received_rows, compute=compute,
                                    collective=RAGGED_COLLECTIVE[0])

  # Chosen for the platform being traced for (a program compiled here for TPU keeps the
  # ragged path), in Python: a `lax.platform_dependent` conditional holding the exchange's
  # collectives deadlocks XLA's CPU runtime (moma_jax/model/kernels.py).
  if RAGGED_EVERYWHERE[0] or pallas_kernels.backend() in ('gpu', 'tpu'):
    returned = ragged(rows, plan.group_sizes)
  else:
    returned = dense(rows, plan.group_sizes)
  y = plan.combine(returned, ops)
  return y.reshape(g, n, d), plan.kept
