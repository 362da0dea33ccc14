"""Routed experts (moma, moe, topk): routers -> selections -> one plan -> experts.

All experts of all groups live in stacked weights [E, ...] (E = total experts), so one
grouped matmul serves every modality and expert parallelism shards one `expert` axis.
The groups are interleaved in that stack (`RoutingSpec.slots`): any expert-axis size
that divides every group's expert count gives each device the same share of every
group, so devices carry equal work whatever the modality mix. A token reaches only the
experts of the groups serving its modality, so no gradient flows from one modality's
tokens into another modality's experts.

Axis legend: G routing groups, N tokens per group, D embed, E experts (all groups),
F SwiGLU hidden, K candidate slots per expert, R rows, C rows per expert and group.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from moma_jax import configs
from moma_jax.model import aux_router
from moma_jax.model import causal_experts
from moma_jax.model import expert_parallel
from moma_jax.model import kernels
from moma_jax.model.layers import default_kernel_init
from moma_jax.model import mesh as mesh_lib
from moma_jax.model import param_names
from moma_jax.model import route_stats
from moma_jax.model import routers
from moma_jax.model import routing
from moma_jax.model import names
from moma_jax.model.routing_spec import RoutingSpec
from moma_jax.model.run_mode import DecoderPart


class RoutedExperts(DecoderPart):
  """A sparse SwiGLU FFN: routers, expert choice or token choice, grouped matmul.

  x [G, N, D], modality [G, N] int, valid [G, N] bool -> y [G, N, D].
  config: the model's config block; spec: its routing sizes.
  Sows per-layer routing statistics into the `names.ROUTE_STATS` collection
  (moma_jax/model/route_stats.py), the token-choice load-balancing loss into
  `names.BALANCE_LOSS`, and into `names.INTERMEDIATES` what each expert took ('selection': candidates
  idx, gate [G, E, K] in stacked order and kept [G, E], the same on every mesh) and, on
  one device, the routing plan ('plan').

  config, spec, mode: `DecoderPart` (moma_jax/model/run_mode.py). mode.aux_routers:
  each group has an auxiliary router (moma_jax/model/aux_router.py) that learns the
  group's decisions. mode.causal: no token looks at another (`CausalChoice`,
  moma_jax/model/causal_experts.py).
  """

  @nn.compact
  def __call__(self, x, modality, valid, deterministic: bool = True):
    m, spec = self.config, self.spec
    g, n, d = x.shape
    hidden = configs.ffn_hidden(m)
    init_in = nn.with_logical_partitioning(default_kernel_init, ('expert', 'embed', 'mlp'))
    init_out = nn.with_logical_partitioning(default_kernel_init, ('expert', 'mlp', 'embed'))
    e_total = spec.num_experts
    wi_0 = self.param('wi_0', init_in, (e_total, d, hidden), self.param_dtype)
    wi_1 = self.param('wi_1', init_in, (e_total, d, hidden), self.param_dtype)
    wo = self.param('wo', init_out, (e_total, hidden, d), self.param_dtype)
    causal = self.mode.causal
    if causal and not spec.token_choice and not self.mode.aux_routers:
      raise ValueError('causal mode of expert choice needs the auxiliary routers')
    ops = kernels.resolve(m.kernels, matmul_tiles=configs.matmul_tiles(m))

    parts, causal_w, per_group = [], [], []
    for group in spec.groups:
      w_router = self.param(param_names.expert_router(group.name),
                            nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                         ('embed', None)),
                            (d, group.experts), self.param_dtype)
      eligible = valid & jnp.isin(modality, jnp.asarray(group.modalities))
      noisy = m.router_noise != 'none' and not deterministic
      logits, scores = routers.scores(
          x, w_router, m.router, self.make_rng('router') if noisy else None,
          eligible if noisy and m.router_noise == 'gumbel_scaled' else None)
      aux = aux_logits = aux_margins = None
      if self.mode.aux_routers and not spec.token_choice:
        aux = aux_router.AuxRouter(group.experts, self.param_dtype,
                                   name=param_names.aux_router(group.name))
        aux_logits, aux_margins = aux(x)                                    # [G, N, E_i]
      per_group.append((group.name, logits, eligible))
      if causal:
        decide = routers.CausalChoice(spec.top_k if spec.token_choice else None)
        causal_w.append(decide(scores, eligible, aux_margins))
        if aux is not None:
          aux.record(aux_logits, aux_margins, eligible[..., None], modality)
        continue
      if spec.token_choice:
        selection, balance = routers.TokenChoice(spec.top_k, spec.topk_capacity(n))(
            scores, eligible)
        self.sow(names.BALANCE_LOSS, 'load_balance', balance)
      else:
        selection = routers.ExpertChoice(group.capacity, ops.select)(scores, eligible)
        if aux is not None:
          aux.score(aux_logits, aux_router.taken_mask(selection.idx, selection.wanted, n),
                    eligible[..., None], group.name)
      parts.append(selection)

    weights = tuple(w.astype(self.dtype) for w in (wi_0, wi_1, wo))
    x_in = x.astype(self.dtype)
    if causal:
      w = jnp.concatenate(causal_w, axis=-1)[..., list(spec.order)]        # [G, N, E]
      y = causal_experts.every_expert_ffn(x_in, w, *weights)
      stats = route_stats.causal_stats(causal_w, per_group, w, modality, valid,
                                       m.modalities)
    else:
      selection = routing.Selection.stack(parts, spec.order)               # [G, E, K]
      y, kept = self._routed(x_in, selection, weights, ops)
      # What each expert took, whatever the mesh: candidates past `kept` are not taken.
      self.sow(names.INTERMEDIATES, 'selection',
               dict(idx=selection.idx, gate=selection.gate, kept=kept))
      stats = route_stats.expert_stats(selection, kept, per_group, spec, modality, valid,
                                       m.modalities)
    for key, value in stats.items():
      self.sow(names.ROUTE_STATS, key, value)
    return y.astype(x_in.dtype)

  def _routed(self, x, selection, weights, ops):
    """y [G, N, D] and kept [G, E] of the stacked selection, on this device's mesh."""
    spec = self.spec
    g, n, _ = x.shape
    if mesh_lib.is_sharded():
      # The capacity layout's cut applies under expert parallelism too.
      if spec.layout == 'capacity':
        selection = selection.cap(spec.buffer_capacity(n))
      k = selection.idx.shape[-1]
      return expert_parallel.routed_ffn(
          x, selection, weights, local_ffn=functools.partial(local_ffn, spec=spec, ops=ops),
          buffer_rows=functools.partial(spec.ep_buffer_rows, n, k),
          send_rows=functools.partial(spec.ep_send_rows, n),
          received_rows=functools.partial(spec.ep_received_rows, n),
          rows_per_token=spec.rows_per_token, ops=ops)
    y, kept, plan = local_ffn(x, selection, weights, spec=spec, ops=ops)
    self.sow(names.INTERMEDIATES, 'plan', plan)
    return y, kept


def local_ffn(x, selection: routing.Selection, weights, *, spec: RoutingSpec,
              ops: kernels.Ops):
  """The expert FFN of routing groups that all live on this device.

  x [G, N, D]; selection [G, E, K] in stacked order; weights (wi_0, wi_1 [E, D, F],
  wo [E, F, D]). Returns y [G, N, D], kept [G, E] and the routing plan (layout
  `spec.layout`).
  """
  g, n, d = x.shape
  plan = routing.pack(selection, num_tokens=n, layout=spec.layout,
                      rows=g * spec.ragged_rows(n), capacity=spec.buffer_capacity(n),
                      rows_per_token=spec.rows_per_token)
  rows = plan.dispatch(x.reshape(g * n, d), ops)                        # [R, D]
  out = apply_experts(rows, plan, *weights, ops=ops)                     # [R, D]
  return plan.combine(out, ops).reshape(g, n, d), plan.kept, plan


def apply_experts(rows, plan: routing.RoutingPlan, wi_0, wi_1, wo, ops=kernels.XLA):
  """SwiGLU of each row with its expert's weights.

  rows [R, D]; wi_* [E, D, F]; wo [E, F, D] -> [R, D].
  ragged layout: a grouped matmul over the per-expert row counts (rows past their sum
  come out zero). capacity layout: rows are [E, R/E] blocks, one batched matmul.
  """
  with jax.named_scope(names.EXPERT_FFN):
    if plan.capacity is None:
      return ops.swiglu_ragged(rows, plan.rows_per_expert, wi_0, wi_1, wo)
    e = wi_0.shape[0]
    blocks = rows.reshape(e, -1, rows.shape[-1])                        # [E, R/E, D]
    return ops.swiglu_blocks(blocks, wi_0, wi_1, wo).reshape(rows.shape)
