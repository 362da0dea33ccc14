"""Expert parallelism: routed rows travel to their expert's device and back.

Under a mesh (`jax.set_mesh`) of the axes ('data', 'fsdp', 'expert', 'tensor'), the
routing groups are split over the batch axes ('data', 'fsdp', 'expert') and the stacked
expert weights over 'expert'. Routing decisions are made per group before this module
runs, so they do not depend on the mesh. Here, inside `jax.shard_map`, every device
  1. packs the rows its groups send to each expert into one buffer of C rows per expert
     (the 'buffer' layout of `routing.pack`; rows past C are cut and counted as dropped),
  2. exchanges the buffers over 'expert' with `jax.lax.all_to_all`, so that each device
     holds, for each of its own experts, the rows every device of its expert row sent,
  3. runs its experts on them (one batched SwiGLU), sends the results back the same way
     and adds them, weighted by their gates, to the tokens they came from.
With an `expert` axis of size 1 no rows cross devices: each device runs the
single-device path (`routing.layout`) on its own groups.

C, `buffer_rows`: with `routing.ep_capacity_factor = None` (exact) every row a shard's
groups can ask for, so results equal the single-device ones; with a factor f,
ceil(f * rows an expert expects from the shard), which costs less memory and traffic
and may cut rows. (`jax.lax.ragged_all_to_all` would send only the rows in use; XLA's
CPU backend does not implement it, so the dense exchange is the one path.)

Axis legend: G routing groups on this device, N tokens per group, D embed, E experts
(all groups, stacked order), X size of the 'expert' axis, E_x = E / X experts per
device, K candidate slots per expert, C buffer rows per expert and device, F hidden.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from moma_jax.model import kernels
from moma_jax.model import routing

BATCH_AXES = ('data', 'fsdp', 'expert')   # mesh axes that split the batch
EXPERT_AXIS = 'expert'


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
               buffer_rows: Callable[[int], int], rows_per_token: int,
               ops: kernels.Ops = kernels.XLA):
  """The expert FFN of all routing groups, under the current mesh.

  x [G_all, N, D]; selection [G_all, E, K] in stacked order (all groups, split over
  the batch axes); weights (wi_0, wi_1 [E, D, F], wo [E, F, D]).
  local_ffn(x, selection, weights) -> (y, kept, plan): the single-device path.
  buffer_rows(groups_per_device) -> C. rows_per_token: the most rows one token occupies.
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
    capacity = buffer_rows(x.shape[0] // shards)

    def body(x, selection, *w):
      return exchange(x, selection, w, capacity=capacity, x_size=x_size,
                      rows_per_token=rows_per_token, ops=ops)
    w_spec = P(EXPERT_AXIS)
  # pallas_call outputs carry no varying-axes annotation, which the check needs.
  return jax.shard_map(body, in_specs=(spec, spec) + (w_spec,) * 3, out_specs=(spec, spec),
                       check_vma=not ops.pallas)(x, selection, *weights)


def exchange(x, selection: routing.Selection, weights, *, capacity: int, x_size: int,
             rows_per_token: int, ops: kernels.Ops = kernels.XLA):
  """One device's part of the expert-parallel FFN (inside shard_map).

  x [G, N, D]; selection [G, E, K]; weights: this device's experts, wi_* [E_x, D, F],
  wo [E_x, F, D]; rows_per_token: the most rows one token occupies. Returns
  y [G, N, D] and kept [G, E].
  """
  g, n, d = x.shape
  e = selection.idx.shape[1]
  e_x = e // x_size
  plan = routing.pack(selection, num_tokens=n, layout='buffer', capacity=capacity,
                      rows_per_token=rows_per_token)
  rows = plan.dispatch(x.reshape(g * n, d), ops)                        # [E*C, D]
  # Expert e lives on device e // E_x of the expert axis: [E*C, D] -> [X, E_x*C, D].
  sent = rows.reshape(x_size, e_x * capacity, d)
  got = jax.lax.all_to_all(sent, EXPERT_AXIS, 0, 0)                      # [X src, E_x*C, D]
  per_expert = got.reshape(x_size, e_x, capacity, d).transpose(1, 0, 2, 3).reshape(
      e_x, x_size * capacity, d)                                          # [E_x, X*C, D]
  out = ops.swiglu_blocks(per_expert, *weights)                          # [E_x, X*C, D]
  back = out.reshape(e_x, x_size, capacity, d).transpose(1, 0, 2, 3).reshape(
      x_size, e_x * capacity, d)
  returned = jax.lax.all_to_all(back, EXPERT_AXIS, 0, 0)                  # [X dst, E_x*C, D]
  y = plan.combine(returned.reshape(e * capacity, d), ops)
  return y.reshape(g, n, d), plan.kept
