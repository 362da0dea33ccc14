"""Expert groups (moma, moe, topk) applied through one routing plan.

All experts of all groups live in stacked weights [E, ...] (E = total experts; group i
owns a contiguous range), so one grouped matmul serves every modality and expert
parallelism shards one `expert` axis. A token reaches only the experts of the groups
serving its modality, so no gradient flows from one modality's tokens into another
modality's experts.

Axis legend: G routing groups, N tokens per group, D embed, E experts (all groups),
F SwiGLU hidden, K candidate slots per expert, R rows, C rows per expert and group.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moma_jax import configs
from moma_jax.model import routing
from moma_jax.model.layers import default_kernel_init, swiglu


def group_names(model: ml_collections.ConfigDict) -> tuple[str, ...]:
  """A name per expert group: the modality for moma, 'all' for moe/topk."""
  if model.ffn == 'moma':
    return tuple(model.modalities)
  return ('all',)


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


def buffer_capacity(config: ml_collections.ConfigDict, n: int) -> int:
  """Rows per expert and group in the capacity layout (the largest over groups).

  Expert choice: ceil(capacity_factor * c_i * expected share of group i's tokens * N).
  """
  m = config.model
  if m.ffn == 'topk':
    return topk_capacity(m, n)
  shares = configs.expected_fractions(config)
  factor = configs.as_fraction(config.routing.capacity_factor)
  best = 1
  for (mods, _), c in zip(configs.expert_groups(m), configs.group_capacities(m)):
    share = configs.as_fraction(min(1.0, sum(shares[i] for i in mods)))
    best = max(best, min(n, configs.ceil_frac(factor * c * share, n)))
  return best


class RoutedExperts(nn.Module):
  """A sparse SwiGLU FFN: routers, expert choice or token choice, grouped matmul.

  x [G, N, D], modality [G, N] int, valid [G, N] bool -> y [G, N, D].
  Sows per-layer routing statistics into the 'route_stats' collection, the
  token-choice load-balancing loss into 'aux_loss' and the routing plan into
  'intermediates' (read by tests and the routing notebook).
  """
  config: ml_collections.FrozenConfigDict
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

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

    cands, logits_all = [], []
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
      if m.ffn == 'topk':
        idx, gate, wanted, assign = routing.token_choice(
            scores, eligible, m.top_k, topk_capacity(m, n))
        self._sow_balance_loss(scores, assign, eligible, m.top_k)
      else:
        idx, gate, wanted = routing.expert_choice(scores, eligible[..., None], cap)
      cands.append((idx, gate, wanted))
      logits_all.append((name, logits, eligible))

    k = max(c[0].shape[-1] for c in cands)
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, k - a.shape[-1])))
    idx = jnp.concatenate([pad(c[0]) for c in cands], axis=1)            # [G, E, K]
    gate = jnp.concatenate([pad(c[1]) for c in cands], axis=1)
    wanted = jnp.concatenate([c[2] for c in cands], axis=1)             # [G, E]
    layout = self.config.routing.layout
    plan = routing.pack(idx, gate, wanted, num_tokens=n, layout=layout,
                        rows=g * ragged_rows(self.config, n),
                        capacity=buffer_capacity(self.config, n))

    self.sow('intermediates', 'plan', plan)
    x_flat = x.reshape(g * n, d).astype(self.dtype)
    rows = routing.gather_rows(x_flat, plan)                            # [R, D]
    cast = lambda w: w.astype(self.dtype)
    out = apply_experts(rows, plan, cast(wi_0), cast(wi_1), cast(wo))  # [R, D]
    y = routing.combine_rows(out, plan, g * n).reshape(g, n, d)
    self._sow_stats(plan, modality, valid, logits_all, groups, names)
    return y

  def _sow_balance_loss(self, scores, assign, eligible, top_k):
    """Switch/GShard balance loss E * sum_e f_e * P_e over the group's valid tokens."""
    e = scores.shape[-1]
    count = jnp.maximum(eligible.sum(), 1)
    f = (assign & eligible[..., None]).sum((0, 1)) / (count * top_k)
    p = jnp.where(eligible[..., None], scores, 0).sum((0, 1)) / count
    self.sow('aux_loss', 'load_balance', e * jnp.sum(f * p))

  def _sow_stats(self, plan, modality, valid, logits_all, groups, names):
    m = self.config.model
    g, n = modality.shape
    taken = routing.experts_per_token(plan, g * n).reshape(g, n)
    n_valid = jnp.maximum(valid.sum(), 1)
    self.sow('route_stats', 'tokens_per_expert', plan.kept.sum(0) / g)
    max_e = max(e for _, e in groups) if m.ffn != 'topk' else m.top_k
    hist = jnp.stack([((taken == i) & valid).sum() for i in range(max_e + 1)]) / n_valid
    self.sow('route_stats', 'experts_per_token', hist)
    for i, mod in enumerate(m.modalities):
      of_mod = valid & (modality == i)
      self.sow('route_stats', f'left_behind/{mod}',
               ((taken == 0) & of_mod).sum() / jnp.maximum(of_mod.sum(), 1))
    start = 0
    for (_, e), name, (_, logits, eligible) in zip(groups, names, logits_all):
      wanted = plan.wanted[:, start:start + e].sum()
      kept = plan.kept[:, start:start + e].sum()
      start += e
      self.sow('route_stats', f'dropped/{name}', (wanted - kept) / jnp.maximum(wanted, 1))
      sel = jnp.broadcast_to(eligible[..., None], logits.shape)
      cnt = jnp.maximum(sel.sum(), 1)
      mean = jnp.where(sel, logits, 0).sum() / cnt
      var = jnp.where(sel, (logits - mean) ** 2, 0).sum() / cnt
      self.sow('route_stats', f'router_logit_mean/{name}', mean)
      self.sow('route_stats', f'router_logit_std/{name}', jnp.sqrt(var))


def apply_experts(rows, plan: routing.RoutingPlan, wi_0, wi_1, wo):
  """SwiGLU of each row with its expert's weights.

  rows [R, D]; wi_* [E, D, F]; wo [E, F, D] -> [R, D].
  ragged layout: `jax.lax.ragged_dot` over the per-expert row counts (rows past their
  sum come out zero). capacity layout: rows are [E, G*C] blocks, one batched einsum.
  """
  if plan.capacity is None:
    gs = plan.group_sizes
    h = nn.silu(jax.lax.ragged_dot(rows, wi_0, gs)) * jax.lax.ragged_dot(rows, wi_1, gs)
    return jax.lax.ragged_dot(h, wo, gs)
  e = wi_0.shape[0]
  blocks = rows.reshape(e, -1, rows.shape[-1])                          # [E, G*C, D]
  out = jax.vmap(swiglu)(blocks, wi_0, wi_1, wo)
  return out.reshape(rows.shape)

