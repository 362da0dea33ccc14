"""Mixture-of-depths: a block that only the routed tokens go through.

A scalar sigmoid router scores every token; the top ceil(c_d * b) non-padding tokens of
each routing group (over all modalities, or ceil(c_d * b_m) per modality when
`mod.modality_aware`) run the whole block — attention among picked tokens, then the
FFN or expert groups, routed among the picked tokens — and the block's residual update
is scaled by the router weight: x <- x + r * (block(x) - x). The others skip it.

Axis legend: B batch, L length, D embed, G routing groups, N = S * L tokens per group
(S sequences per group), P picked slots per group.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moma_jax import configs
from moma_jax.model import aux_router
from moma_jax.model.block import Block
from moma_jax.model import kernels
from moma_jax.model import param_names
from moma_jax.model import routing
from moma_jax.model import names
from moma_jax.model.routing_spec import RoutingSpec
from moma_jax.model.run_mode import DecoderPart


def depth_plan(scores, modality, valid, spec: RoutingSpec, ops: kernels.Ops = kernels.XLA):
  """Which tokens run the block: a per-group routing plan with P rows per group.

  scores [G, N] float32, modality [G, N], valid [G, N] bool -> RoutingPlan whose
  token_index [G*P] lists each group's picked tokens in increasing position (so that
  causal attention among them is index order), unused slots last. ops.select picks.
  """
  g, n = scores.shape
  if spec.mod_per_modality:
    mods = jnp.arange(spec.num_modalities)
    eligible = valid[..., None] & (modality[..., None] == mods)            # [G, N, M]
  else:
    eligible = valid[..., None]                                             # [G, N, 1]
  e = eligible.shape[-1]
  selection = routing.expert_choice(
      jnp.broadcast_to(scores[..., None], (g, n, e)), eligible, spec.mod_capacity,
      select=ops.select)
  p = spec.picked_slots(n)
  plan = routing.pack(selection, num_tokens=n, layout='ragged', rows=g * p, per_group=True)
  tok = plan.token_index.reshape(g, p)
  order = jnp.argsort(tok, axis=-1)  # dump index g*n sorts last
  return plan.replace(
      token_index=jnp.take_along_axis(tok, order, -1).reshape(-1),
      weight=jnp.take_along_axis(plan.weight.reshape(g, p), order, -1).reshape(-1))


class DepthRoutedBlock(DecoderPart):
  """A mixture-of-depths block. Same signature as `Block`: x [B, L, D] -> [B, L, D].

  config, spec, mode: `DecoderPart` (moma_jax/model/run_mode.py). The picking,
  gathering and scattering follow `model.kernels` (moma_jax/model/kernels.py), as the
  FFN inside does. mode.aux_routers: an auxiliary router learns which tokens the layer
  picks. mode.causal: a token
  runs the block when its auxiliary router says so (logit > 0), weighted by the main
  router; the block runs on every position, and tokens that skip it are masked out of
  its attention (segment 0), so the result equals running the picked tokens alone.
  """
  rows_per_group: int = 1

  @nn.compact
  def __call__(self, x, modality, segment_ids, positions, deterministic: bool = True):
    b, l, d = x.shape
    s = self.rows_per_group
    g, n = b // s, s * l
    w = self.param(param_names.MOD_ROUTER, nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ('embed',)), (d,), self.param_dtype)
    with jax.named_scope(names.ROUTING):
      logits = jnp.einsum('bld,d->bl', x.astype(jnp.float32), w.astype(jnp.float32))
    valid = segment_ids > 0
    block = Block(self.config, self.spec, self.mode, rows_per_group=1,
                  name=param_names.MOD_BLOCK)
    aux = None
    if self.mode.aux_routers:
      # A modality-aware layer picks c_d of each modality: a threshold per modality.
      per_mod = self.spec.mod_per_modality
      aux = aux_router.AuxRouter(1, self.param_dtype,
                                 threshold_rows=self.spec.num_modalities if per_mod else 1,
                                 name=param_names.aux_router())
      aux_logits, aux_margins = aux(x, modality if per_mod else None)       # [B, L, 1]
      aux_logits, aux_margins = aux_logits[..., 0], aux_margins[..., 0]     # [B, L]
    if self.mode.causal:
      if aux is None:
        raise ValueError('causal mode of mixture-of-depths needs the auxiliary routers')
      picked = valid & (aux_margins > 0)
      rows = (modality[..., None] == jnp.arange(self.spec.num_modalities) if per_mod
              else jnp.ones((b, l, 1), bool))
      aux.record(aux_logits[..., None], aux_margins[..., None], valid[..., None] & rows,
                 modality)
      out = block(x, modality, jnp.where(picked, segment_ids, 0), positions, deterministic)
      r = jnp.where(picked, jax.nn.sigmoid(logits), 0.0)[..., None]
      self.sow(names.ROUTE_STATS, 'mod/picked', picked.sum() / jnp.maximum(valid.sum(), 1))
      return x + (r * (out - x)).astype(x.dtype)
    ops = kernels.resolve(self.config.kernels,
                          matmul_tiles=configs.matmul_tiles(self.config))
    with jax.named_scope(names.ROUTING):
      plan = depth_plan(jax.nn.sigmoid(logits).reshape(g, n), modality.reshape(g, n),
                        valid.reshape(g, n), self.spec, ops)
      # Sequences of one group share a row after picking: give each (sequence, segment)
      # its own id so attention never crosses sequences. Padding keeps 0.
      seq = jnp.arange(b, dtype=jnp.int32)[:, None]
      seg_key = jnp.where(valid, seq * (l + 1) + segment_ids.astype(jnp.int32), 0)
      x_p = plan.dispatch(x.reshape(g, n, d), ops)                          # [G, P, D]
      mod_p, seg_p, pos_p = (plan.take(a.reshape(g, n))
                             for a in (modality, seg_key, positions))        # [G, P]
    self.sow(names.INTERMEDIATES, 'plan', plan)
    out = block(x_p, mod_p, seg_p, pos_p, deterministic)
    # Picked tokens get x + r * (block(x) - x); the plan's weight is r.
    with jax.named_scope(names.ROUTING):
      y = x.reshape(g, n, d) + plan.combine(out - x_p, ops).astype(x.dtype)
    if aux is not None:
      picked = jnp.zeros(g * n + 1, bool).at[plan.token_index].set(True)[:g * n]
      aux.score(aux_logits.reshape(g, n, 1), picked.reshape(g, n, 1),
                valid.reshape(g, n, 1), 'depth')
    self.sow(names.ROUTE_STATS, 'mod/picked', plan.kept.sum() / jnp.maximum(valid.sum(), 1))
    self.sow(names.ROUTE_STATS, 'mod/router_logit_mean',
             jnp.where(valid, logits, 0).sum() / jnp.maximum(valid.sum(), 1))
    return y.reshape(b, l, d)
