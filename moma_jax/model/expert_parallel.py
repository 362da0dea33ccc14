"""Expert parallelism: routed rows travel to their expert's device and back.

Under a mesh (`jax.set_mesh`) of the axes ('data', 'fsdp', 'expert', 'tensor'), the
routing groups are split over the batch axes ('data', 'fsdp', 'expert') and the stacked
expert weights over 'expert'. Routing decisions are made per group before this module
runs, so they do not depend on the mesh. Here, inside `jax.shard_map`, every device
  1. gathers the rows its groups route, expert after expert (the ragged layout of
     `routing.pack`, S static rows, `RoutingSpec.ep_send_rows`: the rows its groups can
     route, about half of E buffers of C rows at 4t4i); an expert takes at most C rows
     from one device, rows past C are cut and counted as dropped;
  2. exchanges the row counts per expert, then only the used rows, over 'expert'
     (moma_jax/model/ragged_exchange.py), so that each device holds, for each of its
     own experts, the rows every device of its expert row sent;
  3. lines up the rows it received, expert after expert (R_recv static rows,
     `RoutingSpec.ep_received_rows`), runs its experts on them with the ragged grouped
     matmul of `model.kernels`, sends the results back the same way and adds them,
     weighted by their gates, to the tokens they came from.
With an `expert` axis of size 1 no rows cross devices: each device runs the
single-device path (`routing.layout`) on its own groups.

C, `buffer_rows`: with `routing.ep_buffer_factor = None` (exact) every row a shard's
groups can ask of one expert, so results equal the single-device ones; with a factor f,
ceil(f * rows an expert expects from the shard), which may cut rows.

Axis legend: G routing groups on this device, N tokens per group, D embed, E experts
(all groups, stacked order), X size of the 'expert' axis, E_x = E / X experts per
device, K candidate slots per expert, C the most rows per expert and device, S rows a
device sends, F hidden.
"""
from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from moma_jax.model import kernels
from moma_jax.model import mesh as mesh_lib
from moma_jax.model import ragged_exchange
from moma_jax.model import routing
from moma_jax.model import names



def routed_ffn(x, selection: routing.Selection, weights, *, local_ffn: Callable,
               buffer_rows: Callable[[int], int], send_rows: Callable[[int, int], int],
               received_rows: Callable[[int, int], int], rows_per_token: int,
               ops: kernels.Ops = kernels.XLA):
  """The expert FFN of all routing groups, under the current mesh.

  x [G_all, N, D]; selection [G_all, E, K] in stacked order (all groups, split over
  the batch axes); weights (wi_0, wi_1 [E, D, F], wo [E, F, D]).
  local_ffn(x, selection, weights) -> (y, kept, plan): the single-device path.
  buffer_rows(groups_per_device) -> C; send_rows(groups_per_device, C) -> S;
  received_rows(groups_per_device, X*E_x*C) -> R_recv. rows_per_token: the most rows
  one token occupies. ops: the gather, SwiGLU and combine to use (`model.kernels`).
  Returns y [G_all, N, D] and kept [G_all, E].
  """
  mesh = jax.sharding.get_abstract_mesh()
  spec = P(mesh_lib.batch_axes(mesh))
  shards = mesh_lib.batch_shards(mesh)
  if x.shape[0] % shards:
    raise ValueError(f'{x.shape[0]} routing groups do not split over {shards} batch shards')
  x_size = mesh.shape.get(mesh_lib.EXPERT, 1)
  if x_size == 1:
    def body(x, selection, *w):
      y, kept, _ = local_ffn(x, selection, w)
      return y, kept
    w_spec = P()
  else:
    local_groups = x.shape[0] // shards
    capacity = buffer_rows(local_groups)
    sizes = dict(capacity=capacity, send_rows=send_rows(local_groups, capacity),
                 received_rows=received_rows(local_groups,
                                             selection.idx.shape[1] * capacity))

    def body(x, selection, *w):
      return exchange(x, selection, w, x_size=x_size, rows_per_token=rows_per_token,
                      ops=ops, **sizes)
    w_spec = P(mesh_lib.EXPERT)
  # pallas_call outputs carry no varying-axes annotation, which the check needs.
  return jax.shard_map(body, in_specs=(spec, spec) + (w_spec,) * 3, out_specs=(spec, spec),
                       check_vma=not ops.pallas)(x, selection, *weights)


def exchange(x, selection: routing.Selection, weights, *, capacity: int, send_rows: int,
             received_rows: int, x_size: int, rows_per_token: int,
             ops: kernels.Ops = kernels.XLA):
  """One device's part of the expert-parallel FFN (inside shard_map).

  x [G, N, D]; selection [G, E, K]; weights: this device's experts, wi_* [E_x, D, F],
  wo [E_x, F, D]. capacity: C, the most rows this device sends one expert (rows past
  it are cut); send_rows: S, static rows of its ragged layout; received_rows: R_recv,
  a static bound on the rows its experts receive; rows_per_token: the most rows one
  token occupies. Returns y [G, N, D] and kept [G, E].
  """
  g, n, d = x.shape
  plan = routing.pack(selection, num_tokens=n, layout='ragged', rows=send_rows,
                      expert_limit=capacity, rows_per_token=rows_per_token)
  rows = plan.dispatch(x.reshape(g * n, d), ops)                        # [S, D]

  def compute(rows_in, sizes):
    with jax.named_scope(names.EXPERT_FFN):
      return ops.swiglu_ragged(rows_in, sizes, *weights)

  returned = ragged_exchange.exchange(rows, plan.rows_per_expert, x_size=x_size,
                                      received_rows=received_rows, compute=compute)
  y = plan.combine(returned, ops)
  return y.reshape(g, n, d), plan.kept
