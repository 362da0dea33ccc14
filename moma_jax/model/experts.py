"""Expert groups (moma, moe, topk) applied through one routing plan.

All experts of all groups live in stacked weights [E, ...] (E = total experts), so one
grouped matmul serves every modality and expert parallelism shards one `expert` axis.
The groups are interleaved in that stack (`stacked_slots`): any expert-axis size that
divides every group's expert count gives each device the same share of every group, so
devices carry equal work whatever the modality mix. A token reaches only the experts of
the groups serving its modality, so no gradient flows from one modality's tokens into
another modality's experts.

Axis legend: G routing groups, N tokens per group, D embed, E experts (all groups),
F SwiGLU hidden, K candidate slots per expert, R rows, C rows per expert and group.
"""
from __future__ import annotations

import fractions
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moma_jax import configs
from moma_jax.model import aux_router
from moma_jax.model import expert_parallel
from moma_jax.model import kernel_ops
from moma_jax.model import routing
from moma_jax.model.layers import default_kernel_init


def group_names(model: ml_collections.ConfigDict) -> tuple[str, ...]:
  """A name per expert group: the modality for moma, 'all' for moe/topk."""
  if model.ffn == 'moma':
    return tuple(model.modalities)
  return ('all',)


def ep_buffer_rows(config: ml_collections.ConfigDict, n: int, k: int, groups: int) -> int:
  """C: rows a device sends each expert under expert parallelism, for `groups` routing
  groups of N tokens whose experts have K candidate slots each.

  `routing.ep_capacity_factor` None: all G*K (exact, nothing cut); a factor f:
  ceil(f * G * the rows an expert expects per group) (the capacity layout's rule at
  factor 1), at most G*K.
  """
  exact = groups * min(k, buffer_capacity(config, n)
                       if config.routing.layout == 'capacity' else k)
  factor = config.routing.ep_capacity_factor
  if factor is None:
    return exact
  return max(1, min(exact, math.ceil(factor * groups * buffer_capacity(config, n, 1.0))))


def stacked_slots(model: ml_collections.ConfigDict) -> tuple[tuple[int, ...], ...]:
  """slots[i][j]: the index in the stacked weights of expert j of group i.

  Experts are ordered by their fractional rank (j + 1/2) / E_i (ties by group): for any
  X dividing every E_i, stack positions [k*E/X, (k+1)*E/X) hold exactly E_i/X experts of
  each group i, so an `expert` mesh axis of size X spreads every group evenly.
  """
  groups = configs.expert_groups(model)
  keys = sorted((fractions.Fraction(2 * j + 1, 2 * e), i, j)
                for i, (_, e) in enumerate(groups) for j in range(e))
  slots = [[0] * e for _, e in groups]
  for position, (_, i, j) in enumerate(keys):
    slots[i][j] = position
  return tuple(tuple(row) for row in slots)


def stack_order(model: ml_collections.ConfigDict) -> np.ndarray:
  """order[s]: the index, in group-concatenated expert order, of stack position s."""
  return np.argsort(np.concatenate([np.asarray(r) for r in stacked_slots(model)]))


def topk_capacity(model: ml_collections.ConfigDict, n: int) -> int:
  """Token choice: tokens an expert keeps per group, ceil(cf * k * N / E), at most N."""
  e = int(model.experts[0])
  cf = configs.as_fraction(model.capacity_factor)
  return min(n, configs.ceil_frac(cf * model.top_k / e, n))


def ragged_rows(config: ml_collections.ConfigDict, n: int) -> int:
  """Rows per routing group in the ragged layout: enough for every wanted row.

  Expert choice: sum_i E_i * ceil(c_i * b_i) <= max_i(c_i * E_i) * N + E,
  and never more than sum_i E_i * ceil(c_i * N). Token choice: min(N * k, E * C).
  """
  m = config.model
  groups = configs.expert_groups(m)
  if m.ffn == 'topk':
    return min(n * m.top_k, groups[0][1] * topk_capacity(m, n))
  caps = configs.group_capacities(m)
  worst = sum(e * min(n, configs.ceil_frac(c, n)) for (_, e), c in zip(groups, caps))
  bound = configs.ceil_frac(max(c * e for (_, e), c in zip(groups, caps)), n) + sum(
      e for _, e in groups)
  return min(worst, bound)


def buffer_capacity(config: ml_collections.ConfigDict, n: int, factor=None) -> int:
  """Rows per expert and group in the capacity layout (the largest over groups).

  Expert choice: ceil(factor * c_i * expected share of group i's tokens * N), factor
  `routing.capacity_factor` unless given.
  """
  m = config.model
  if m.ffn == 'topk':
    return topk_capacity(m, n)
  shares = configs.expected_fractions(config)
  factor = configs.as_fraction(config.routing.capacity_factor if factor is None else factor)
  best = 1
  for (mods, _), c in zip(configs.expert_groups(m), configs.group_capacities(m)):
    share = configs.as_fraction(min(1.0, sum(shares[i] for i in mods)))
    best = max(best, min(n, configs.ceil_frac(factor * c * share, n)))
  return best


class RoutedExperts(nn.Module):
  """A sparse SwiGLU FFN: routers, expert choice or token choice, grouped matmul.

  x [G, N, D], modality [G, N] int, valid [G, N] bool -> y [G, N, D].
  Sows per-layer routing statistics into the 'route_stats' collection, the
  token-choice load-balancing loss into 'aux_loss', and into 'intermediates' what
  each expert took ('selection': candidates idx, gate [G, E, K] in stacked order and
  kept [G, E], the same on every mesh) and, on one device, the routing plan ('plan').

  aux_routers: each group has an auxiliary router (moma_jax/model/aux_router.py) that
  learns the group's decisions. causal: no token looks at another: expert choice is
  replaced by the auxiliary routers' decisions (token choice by its top-k without
  capacity), weighted by the main router's scores; every expert is evaluated on every
  token (E times the FFN's FLOPs: meant for evaluation and decoding).
  """
  config: ml_collections.FrozenConfigDict
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  aux_routers: bool = False
  causal: bool = False

  @nn.compact
  def __call__(self, x, modality, valid, deterministic: bool = True):
    m = self.config.model
    g, n, d = x.shape
    groups = configs.expert_groups(m)
    names = group_names(m)
    e_total = sum(e for _, e in groups)
    hidden = configs.ffn_hidden(m)
    init_in = nn.with_logical_partitioning(default_kernel_init, ('expert', 'embed', 'mlp'))
    init_out = nn.with_logical_partitioning(default_kernel_init, ('expert', 'mlp', 'embed'))
    wi_0 = self.param('wi_0', init_in, (e_total, d, hidden), self.param_dtype)
    wi_1 = self.param('wi_1', init_in, (e_total, d, hidden), self.param_dtype)
    wo = self.param('wo', init_out, (e_total, hidden, d), self.param_dtype)

    if self.causal and m.ffn != 'topk' and not self.aux_routers:
      raise ValueError('causal mode of expert choice needs the auxiliary routers')
    cands, logits_all, causal_w = [], [], []
    caps = configs.group_capacities(m) if m.ffn != 'topk' else (None,)
    for (mods, e), name, cap in zip(groups, names, caps):
      w_router = self.param(f'router_{name}', nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ('embed', None)), (d, e), self.param_dtype)
      logits = jnp.einsum('gnd,de->gne', x.astype(jnp.float32), w_router.astype(jnp.float32))
      noise = None
      if m.router_noise == 'gumbel' and not deterministic:
        noise = self.make_rng('router')
      scores = routing.router_scores(logits, m.router, noise)
      eligible = valid & jnp.isin(modality, jnp.asarray(mods))
      aux = None
      if self.aux_routers and m.ffn != 'topk':
        aux = aux_router.AuxRouter(e, self.param_dtype, name=f'aux_router_{name}')
        aux_logits = aux(x)                                                   # [G, N, E]
      if self.causal:
        if m.ffn == 'topk':
          top = jax.lax.top_k(scores, m.top_k)[1]                         # [G, N, k]
          take = jax.nn.one_hot(top, e, dtype=jnp.int32).sum(-2) > 0
        else:
          take = aux_logits > 0
        causal_w.append((name, jnp.where(take & eligible[..., None], scores, 0.0), eligible))
        continue
      if m.ffn == 'topk':
        idx, gate, wanted, assign = routing.token_choice(
            scores, eligible, m.top_k, topk_capacity(m, n))
        self._sow_balance_loss(scores, assign, eligible, m.top_k)
      else:
        idx, gate, wanted = routing.expert_choice(scores, eligible[..., None], cap,
                                                  select=kernels(self.config).select)
        if aux is not None:
          aux.score(aux_logits, aux_router.taken_mask(idx, wanted, n), eligible[..., None],
                    name)
      cands.append((idx, gate, wanted))
      logits_all.append((name, logits, eligible))

    if self.causal:
      return self._causal_ffn(x, causal_w, (wi_0, wi_1, wo), modality, valid)
    k = max(c[0].shape[-1] for c in cands)
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, k - a.shape[-1])))
    # Group order -> stacked order: position s of the stack is concatenated expert order[s].
    # Static slices, not a gather `[:, order]`: the TPU compiler's emitter rejects that
    # small gather for some shapes (a crash, not an error), and slices cost nothing.
    order = stack_order(m)
    stacked = lambda parts: jnp.concatenate(
        [parts[:, s:s + 1] for s in order], axis=1)
    idx = stacked(jnp.concatenate([pad(c[0]) for c in cands], axis=1))   # [G, E, K]
    gate = stacked(jnp.concatenate([pad(c[1]) for c in cands], axis=1))
    wanted = stacked(jnp.concatenate([c[2] for c in cands], axis=1))     # [G, E]

    cast = lambda w: w.astype(self.dtype)
    weights = (cast(wi_0), cast(wi_1), cast(wo))
    x_in = x.astype(self.dtype)
    if expert_parallel.is_sharded():
      # The capacity layout's cut applies under expert parallelism too.
      if self.config.routing.layout == 'capacity':
        wanted_here = jnp.minimum(wanted, buffer_capacity(self.config, n))
      else:
        wanted_here = wanted
      y, kept = expert_parallel.routed_ffn(
          x_in, idx, gate, wanted_here, weights,
          local_ffn=functools.partial(local_ffn, config=self.config),
          buffer_rows=functools.partial(ep_buffer_rows, self.config, n, k),
          ops=kernels(self.config))
    else:
      y, kept, plan = local_ffn(x_in, idx, gate, wanted, weights, self.config)
      self.sow('intermediates', 'plan', plan)
    # What each expert took, whatever the mesh: candidates past `kept` are not taken.
    self.sow('intermediates', 'selection', dict(idx=idx, gate=gate, kept=kept))
    self._sow_stats(idx, wanted, kept, order, modality, valid, logits_all, groups, names)
    return y.astype(x_in.dtype)

  def _causal_ffn(self, x, per_group, weights, modality, valid):
    """y = sum_e w[..., e] * SwiGLU_e(x): every expert on every token, weighted by the
    causal decisions. per_group: (name, w [G, N, E_i] with 0 where a token is not
    routed, eligible [G, N]) of each group. Sows each expert's share of its eligible
    tokens as `causal_share/{name}` [E_i]."""
    m = self.config.model
    for name, w_i, eligible in per_group:
      share = (w_i > 0).sum((0, 1)) / jnp.maximum(eligible.sum(), 1)
      self.sow('route_stats', f'causal_share/{name}', share)
    order = stack_order(m)
    w = jnp.concatenate([w_i for _, w_i, _ in per_group], axis=-1)[..., order]  # [G, N, E]
    wi_0, wi_1, wo = (a.astype(self.dtype) for a in weights)
    x_in = x.astype(self.dtype)
    h = nn.silu(jnp.einsum('gnd,edf->gnef', x_in, wi_0)) * jnp.einsum(
        'gnd,edf->gnef', x_in, wi_1)
    out = jnp.einsum('gnef,efd->gned', h, wo)
    y = jnp.einsum('gne,gned->gnd', w.astype(out.dtype), out)
    self._sow_left_behind((w > 0).sum(-1), modality, valid)
    return y.astype(x_in.dtype)

  def _sow_left_behind(self, taken, modality, valid):
    """Per modality, the share of its tokens no expert took; taken [G, N] int."""
    for i, mod in enumerate(self.config.model.modalities):
      of_mod = valid & (modality == i)
      self.sow('route_stats', f'left_behind/{mod}',
               ((taken == 0) & of_mod).sum() / jnp.maximum(of_mod.sum(), 1))

  def _sow_balance_loss(self, scores, assign, eligible, top_k):
    """Switch/GShard balance loss E * sum_e f_e * P_e over the group's valid tokens."""
    e = scores.shape[-1]
    count = jnp.maximum(eligible.sum(), 1)
    f = (assign & eligible[..., None]).sum((0, 1)) / (count * top_k)
    p = jnp.where(eligible[..., None], scores, 0).sum((0, 1)) / count
    self.sow('aux_loss', 'load_balance', e * jnp.sum(f * p))

  def _sow_stats(self, idx, wanted, kept, order, modality, valid, logits_all, groups,
                 names):
    m = self.config.model
    g, n = modality.shape
    taken = routing.experts_per_token(idx, kept, n)                     # [G, N]
    n_valid = jnp.maximum(valid.sum(), 1)
    # Statistics per expert in group order (stack position s is expert order[s]).
    inverse = np.argsort(order)
    wanted, kept = wanted[:, inverse], kept[:, inverse]
    self.sow('route_stats', 'tokens_per_expert', kept.sum(0) / g)
    max_e = max(e for _, e in groups) if m.ffn != 'topk' else m.top_k
    hist = jnp.stack([((taken == i) & valid).sum() for i in range(max_e + 1)]) / n_valid
    self.sow('route_stats', 'experts_per_token', hist)
    self._sow_left_behind(taken, modality, valid)
    start = 0
    for (_, e), name, (_, logits, eligible) in zip(groups, names, logits_all):
      want, got = wanted[:, start:start + e].sum(), kept[:, start:start + e].sum()
      start += e
      self.sow('route_stats', f'dropped/{name}', (want - got) / jnp.maximum(want, 1))
      sel = jnp.broadcast_to(eligible[..., None], logits.shape)
      cnt = jnp.maximum(sel.sum(), 1)
      mean = jnp.where(sel, logits, 0).sum() / cnt
      var = jnp.where(sel, (logits - mean) ** 2, 0).sum() / cnt
      self.sow('route_stats', f'router_logit_mean/{name}', mean)
      self.sow('route_stats', f'router_logit_std/{name}', jnp.sqrt(var))


def kernels(config: ml_collections.ConfigDict) -> kernel_ops.Ops:
  """The routing ops of `model.kernels` (XLA or Pallas)."""
  m = config.model
  rows_per_token = m.top_k if m.ffn == 'topk' else max(e for _, e in configs.expert_groups(m))
  return kernel_ops.ops(m.kernels, rows_per_token)


def local_ffn(x, idx, gate, wanted, weights, config: ml_collections.FrozenConfigDict):
  """The expert FFN of routing groups that all live on this device.

  x [G, N, D]; idx, gate [G, E, K] candidates in stacked order; wanted [G, E];
  weights (wi_0, wi_1 [E, D, F], wo [E, F, D]). Returns y [G, N, D], kept [G, E] and the
  routing plan (layout `routing.layout`).
  """
  g, n, d = x.shape
  ops = kernels(config)
  plan = routing.pack(idx, gate, wanted, num_tokens=n, layout=config.routing.layout,
                      rows=g * ragged_rows(config, n), capacity=buffer_capacity(config, n))
  rows = ops.gather(x.reshape(g * n, d), plan.token_index)              # [R, D]
  out = apply_experts(rows, plan, *weights, ops=ops)                     # [R, D]
  y = ops.combine(out, plan.weight, plan.token_index, g * n).reshape(g, n, d)
  return y, plan.kept, plan


def apply_experts(rows, plan: routing.RoutingPlan, wi_0, wi_1, wo, ops=kernel_ops.XLA):
  """SwiGLU of each row with its expert's weights.

  rows [R, D]; wi_* [E, D, F]; wo [E, F, D] -> [R, D].
  ragged layout: a grouped matmul over the per-expert row counts (rows past their sum
  come out zero). capacity and buffer layouts: rows are [E, R/E] blocks, one batched
  matmul.
  """
  if plan.capacity is None:
    return ops.swiglu_ragged(rows, plan.group_sizes, wi_0, wi_1, wo)
  e = wi_0.shape[0]
  blocks = rows.reshape(e, -1, rows.shape[-1])                          # [E, R/E, D]
  return ops.swiglu_blocks(blocks, wi_0, wi_1, wo).reshape(rows.shape)
