"""Routing as pure functions: router scores -> a selection -> a static-shaped plan.

Every sparse path (moma, moe, topk, mixture-of-depths) is two steps:
  1. *select*: per expert, an ordered candidate list of tokens of one routing group,
     with gates, and how many of them the expert wants (`expert_choice`,
     `token_choice`; the `Selection`, made by the routers of moma_jax/model/routers.py);
  2. *pack*: place the wanted candidates into a static number of rows (`pack`).

The routing plan is the result of step 2, and carries its two operations:
`plan.dispatch(x, ops)` gathers the rows `x[token_index]` for a grouped matmul over
experts, and `plan.combine(out, ops)` puts `weight * out` back onto the tokens, with
the ops of `model.kernels` (moma_jax/model/kernels.py). Unused rows carry weight 0 and
the dump index G*N (one past the last token), which gathers zeros and scatters nowhere.

Axis legend: G routing groups, N tokens per group, E experts, K candidate slots per
expert, R rows, C rows per expert per group (capacity layout).
Ties break towards the lower token index (`jax.lax.top_k` and stable sorts do); padding
is never eligible.
"""
from __future__ import annotations

import fractions

import flax
import jax
import jax.numpy as jnp
import numpy as np
from pallas_kernels import references

from moma_jax.model.routing_spec import ceil_frac


@flax.struct.dataclass
class Selection:
  """What each expert chose: candidates idx, gate [G, E, K] (token index within the
  group, gate; in order of preference) and wanted [G, E] (how many leading candidates
  it takes). `order`: None for one group's experts; for the experts of all groups, the
  stack order (`RoutingSpec.order`): position s holds group-concatenated expert
  order[s], as the stacked weights do."""
  idx: jax.Array
  gate: jax.Array
  wanted: jax.Array
  order: tuple[int, ...] | None = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def stack(cls, parts: list['Selection'], order: tuple[int, ...]) -> 'Selection':
    """The selections of the groups, in order, as one over the stacked experts (K: the
    largest group's, candidates past a group's own K padded with token 0, gate 0)."""
    k = max(p.idx.shape[-1] for p in parts)
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, k - a.shape[-1])))
    # Static slices, not a gather `[:, order]`: the TPU compiler's emitter rejects that
    # small gather for some shapes (a crash, not an error), and slices cost nothing.
    stacked = lambda a: jnp.concatenate([a[:, s:s + 1] for s in order], axis=1)
    cat = lambda f: stacked(jnp.concatenate([f(p) for p in parts], axis=1))
    return cls(idx=cat(lambda p: pad(p.idx)), gate=cat(lambda p: pad(p.gate)),
               wanted=cat(lambda p: p.wanted), order=tuple(order))

  def in_group_order(self, per_expert: jax.Array) -> jax.Array:
    """per_expert [G, E, ...] in stack order -> the same in group-concatenated order."""
    return per_expert[:, np.argsort(np.asarray(self.order))]

  def cap(self, limit: int) -> 'Selection':
    """The same selection with no expert wanting more than `limit` rows."""
    return self.replace(wanted=jnp.minimum(self.wanted, limit))


@flax.struct.dataclass
class RoutingPlan:
  """Rows of G routing groups, arranged for a grouped matmul.

  token_index: [R] int32, flat token id g*N + n; G*N for unused rows.
  weight:      [R] float32 gate of each row; 0 for unused rows.
  rows_per_expert: [E] int32 rows of each expert (all groups), sum <= R.
  wanted:      [G, E] int32 rows each expert asked for in each group.
  kept:        [G, E] int32 rows it got (wanted - kept were cut by a buffer or limit).
  capacity:    static; None for the ragged layout (expert e's rows follow expert e-1's),
               else the rows each expert owns, R / E: expert e owns rows
               [e*R/E, (e+1)*R/E) (capacity layout: C rows per group, R/E = G*C).
  num_tokens:  static N, tokens per group.
  rows_per_token: static S, the most rows one token occupies (the Pallas combine's
               inverse map needs it).
  per_group:   static; rows ordered by group (group g owns rows [g*R/G, (g+1)*R/G)):
               `dispatch` and `combine` then work group by group, on [G, N, ...].
  """
  token_index: jax.Array
  weight: jax.Array
  rows_per_expert: jax.Array
  wanted: jax.Array
  kept: jax.Array
  capacity: int | None = flax.struct.field(pytree_node=False, default=None)
  num_tokens: int = flax.struct.field(pytree_node=False, default=0)
  rows_per_token: int = flax.struct.field(pytree_node=False, default=1)
  per_group: bool = flax.struct.field(pytree_node=False, default=False)

  def local_index(self) -> jax.Array:
    """[G, R/G] token index within the group of each row of a per-group plan (N for
    unused rows)."""
    g = self.wanted.shape[0]
    n = self.num_tokens
    index = self.token_index.reshape(g, -1)
    return jnp.minimum(index - (jnp.arange(g) * n)[:, None], n)

  def dispatch(self, x: jax.Array, ops) -> jax.Array:
    """The rows of the plan: x [G*N, D] -> rows [R, D]; for a per-group plan x [G, N, D]
    -> [G, R/G, D], gathered group by group (groups split over devices never need
    another device's tokens). Zeros for unused rows."""
    if self.per_group:
      gather = lambda a, i: ops.gather(a, i, self.rows_per_token)
      return jax.vmap(gather)(x, self.local_index())
    return ops.gather(x, self.token_index, self.rows_per_token)

  def combine(self, out: jax.Array, ops) -> jax.Array:
    """weight * out added back onto the tokens: out [R, D] -> y [G*N, D]; for a
    per-group plan out [G, R/G, D] -> [G, N, D]. Tokens no row holds get 0."""
    g, n = self.wanted.shape[0], self.num_tokens
    if self.per_group:
      combine = lambda o, w, i: ops.combine(o, w, i, n, self.rows_per_token)
      return jax.vmap(combine)(out, self.weight.reshape(g, -1), self.local_index())
    return ops.combine(out, self.weight, self.token_index, g * n, self.rows_per_token)

  def take(self, a: jax.Array) -> jax.Array:
    """A per-group plan's rows of token metadata (integers: modality, positions,
    segments) a [G, N] -> [G, R/G], 0 for unused rows. Bookkeeping, not the data path:
    always XLA's gather."""
    return jax.vmap(references.gather_rows_reference)(a, self.local_index())


def router_scores(logits: jax.Array, kind: str, noise_rng: jax.Array | None = None,
                  noise_scale: jax.Array | None = None) -> jax.Array:
  """Router scores [..., E] in float32 from logits [..., E].

  'sigmoid': independent per expert (the paper); 'softmax': over the group's experts.
  With `noise_rng`, Gumbel-sigmoid noise: sigmoid(z + G' - G'') (logistic noise on z,
  std pi/sqrt(3)), times `noise_scale` (broadcast to logits) when given.
  """
  z = logits.astype(jnp.float32)
  if noise_rng is not None:
    noise = jax.random.logistic(noise_rng, z.shape, jnp.float32)
    z = z + (noise if noise_scale is None else noise * noise_scale)
  if kind == 'sigmoid':
    return jax.nn.sigmoid(z)
  return jax.nn.softmax(z, axis=-1)


def noise_scaled_to_logits(logits: jax.Array, eligible: jax.Array) -> jax.Array:
  """[G, 1, E] float32: the factor that gives logistic noise the standard deviation of
  each expert's logits over its group's eligible tokens (logits [G, N, E], eligible
  [G, N] bool), so the noise reorders tokens about as much as the router separates
  them. A constant of the backward pass; 0 for a group with no eligible token."""
  z = jax.lax.stop_gradient(logits.astype(jnp.float32))
  w = eligible[..., None].astype(jnp.float32)                          # [G, N, 1]
  count = jnp.maximum(w.sum(1, keepdims=True), 1.0)
  mean = (z * w).sum(1, keepdims=True) / count
  std = jnp.sqrt((jnp.square(z - mean) * w).sum(1, keepdims=True) / count)
  return std / (np.pi / np.sqrt(3.0))


def expert_choice(scores: jax.Array, eligible: jax.Array, capacity: fractions.Fraction,
                  select=references.expert_choice_reference) -> Selection:
  """Each expert takes the top ceil(c * b) eligible tokens of the group by its score.

  Args:
    scores: [G, N, E] float32 router scores.
    eligible: [G, N, E] or [G, N, 1] bool, the tokens each expert may take (right
      modality, not padding); b = eligible.sum(1).
    capacity: c, the fraction of eligible tokens each expert takes.
    select: per expert, its top-k eligible tokens (ineligible ones last, gate 0): the
      reference or a kernel computing the same (`Ops.select`, moma_jax/model/kernels.py).
  Returns:
    Selection: idx [G, E, K] int32 candidate tokens in order of preference,
    K = min(N, ceil(c * N)); gate [G, E, K] float32 their scores; wanted [G, E] int32
    = ceil(c * b).
  """
  g, n, e = scores.shape
  k_max = min(n, ceil_frac(capacity, n))
  idx, gate = select(scores, eligible, k_max)
  b = eligible.sum(1).astype(jnp.int32)                          # [G, E] or [G, 1]
  wanted = jnp.broadcast_to(ceil_frac(capacity, b), (g, e))
  return Selection(idx, gate, wanted)


def token_choice(scores: jax.Array, valid: jax.Array, top_k: int, capacity: int):
  """Each token picks its top-k experts; each expert keeps its first `capacity` tokens.

  Args:
    scores: [G, N, E] float32 router scores.
    valid: [G, N] bool, non-padding tokens.
    top_k: experts per token.
    capacity: C, the static number of tokens an expert keeps per group (lower token
      index first, as in GShard/Switch).
  Returns:
    Selection (idx [G, E, C] candidate tokens; gate [G, E, C]; wanted [G, E] tokens that
    picked each expert, wanted - min(wanted, C) are dropped) and assign [G, N, E] bool
    choices.
  """
  e = scores.shape[-1]
  _, top = jax.lax.top_k(scores, top_k)                           # [G, N, k]
  assign = (jax.nn.one_hot(top, e, dtype=jnp.int32).sum(-2) > 0) & valid[..., None]
  # Stable sort of "not assigned" puts each expert's tokens first, in index order.
  order = jnp.argsort(~jnp.swapaxes(assign, 1, 2), axis=-1, stable=True)[..., :capacity]
  gate = jnp.take_along_axis(jnp.swapaxes(scores, 1, 2), order, axis=-1)
  wanted = assign.sum(1).astype(jnp.int32)
  return Selection(order.astype(jnp.int32), gate, wanted), assign


# ----------------------------------------------------------------------------------
# Packing: candidates -> rows. `base[g, e]` is the row of candidate 0 of expert e in
# group g; each layout is a way to choose it.
# ----------------------------------------------------------------------------------
def pack(selection: Selection, *, num_tokens: int, layout: str, rows: int = 0,
         capacity: int = 0, per_group: bool = False, rows_per_token: int = 1,
         expert_limit: int | None = None) -> RoutingPlan:
  """Places each expert's wanted candidates into static rows.

  Args:
    selection: candidates idx, gate [G, E, K] (token index within the group, gate) and
      wanted [G, E], how many leading candidates each expert wants.
    num_tokens: N, tokens per group (the dump index is G*N).
    layout: 'ragged': experts back to back, exactly the wanted rows (nothing cut while
      `rows` holds them, which callers guarantee); 'capacity': a buffer of `capacity`
      rows per expert and group; wanted rows beyond it are cut.
    rows: R, total rows of the ragged layout.
    capacity: C, rows per expert and group ('capacity').
    per_group: ragged rows ordered by routing group first (group g owns rows
      [g*R/G, (g+1)*R/G)) instead of by expert; used by mixture-of-depths.
    rows_per_token: S, the most rows one token occupies.
    expert_limit: ragged layout: at most this many rows per expert over all groups,
      which fill them in group order (expert parallelism's `routing.ep_buffer_factor`);
      the rest are cut. None: no limit.
  Returns:
    RoutingPlan over G*N flat tokens.
  """
  idx, gate, wanted = selection.idx, selection.gate, selection.wanted
  g, e, k = idx.shape
  if layout == 'capacity':
    if k < capacity:
      pad = ((0, 0), (0, 0), (0, capacity - k))
      idx, gate = jnp.pad(idx, pad), jnp.pad(gate, pad)
    idx, gate = idx[..., :capacity], gate[..., :capacity]
    kept = jnp.minimum(wanted, capacity)
    base = (jnp.arange(e)[None, :] * g + jnp.arange(g)[:, None]) * capacity
    total = e * g * capacity
  else:
    kept = jnp.minimum(wanted, k)
    if expert_limit is not None:
      before = jnp.cumsum(kept, axis=0) - kept            # [G, E] rows of earlier groups
      kept = jnp.clip(expert_limit - before, 0, kept)
    if per_group:
      base = jnp.arange(g)[:, None] * (rows // g) + jnp.cumsum(kept, axis=1) - kept
    else:
      per_expert = kept.sum(0)                                        # [E]
      expert_start = jnp.cumsum(per_expert) - per_expert
      base = expert_start[None, :] + jnp.cumsum(kept, axis=0) - kept
    total = rows
  slot = jnp.arange(idx.shape[-1])
  use = slot < kept[..., None]                                        # [G, E, K]
  dest = jnp.where(use, base[..., None] + slot, total).reshape(-1)
  flat_token = (idx + jnp.arange(g)[:, None, None] * num_tokens).reshape(-1)
  dump = g * num_tokens
  token_index = jnp.full((total + 1,), dump, jnp.int32).at[dest].set(
      jnp.where(use.reshape(-1), flat_token, dump))[:total]
  weight = jnp.zeros((total + 1,), jnp.float32).at[dest].set(
      jnp.where(use, gate, 0.0).reshape(-1).astype(jnp.float32))[:total]
  return RoutingPlan(token_index=token_index, weight=weight,
                     rows_per_expert=kept.sum(0).astype(jnp.int32), wanted=wanted, kept=kept,
                     capacity=None if layout == 'ragged' else total // e,
                     num_tokens=num_tokens, rows_per_token=rows_per_token,
                     per_group=per_group)


def experts_per_token(idx: jax.Array, kept: jax.Array, num_tokens: int) -> jax.Array:
  """[G, N] int32: how many experts took each token, from candidates idx [G, E, K] of
  which each expert kept the first kept [G, E]."""
  use = jnp.arange(idx.shape[-1]) < kept[..., None]                     # [G, E, K]
  count = lambda i, u: jnp.zeros((num_tokens + 1,), jnp.int32).at[
      jnp.where(u, i, num_tokens).reshape(-1)].add(1)[:num_tokens]
  return jax.vmap(count)(idx, use)
