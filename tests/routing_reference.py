"""The obviously-correct slow routing: per-expert Python loops over explicit token lists.

This is the specification the fast static-shape routing (moma_jax/model/routing.py,
routers.py, experts.py, depth.py) is tested against; a test oracle, so it lives with
the tests. Decisions are made in NumPy from router scores; outputs
are built with jnp from those lists, so values and gradients can be compared.

Axis legend: G routing groups, N tokens per group, D embed, E experts.
A routing decision is `lists[g][e]`: the tokens expert e took in group g, in the
order of the expert's preference (expert choice: score descending, ties to the lower
index; token choice: token index ascending).
"""
from __future__ import annotations

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np

from moma_jax.model.layers import swiglu
from moma_jax.model import routing
from moma_jax.model import routing_spec

Lists = list[list[list[int]]]  # [G][E] -> token indices


def expert_choice_lists(scores: np.ndarray, eligible: np.ndarray,
                        capacity: fractions.Fraction) -> Lists:
  """scores [G, N, E]; eligible [G, N, E] (or [G, N, 1]) bool."""
  g_count, n, e_count = scores.shape
  lists = []
  for g in range(g_count):
    per_expert = []
    for e in range(e_count):
      col = e if eligible.shape[-1] > 1 else 0
      tokens = [i for i in range(n) if eligible[g, i, col]]
      k = math.ceil(capacity * len(tokens))       # exact: capacity is a Fraction
      ranked = sorted(tokens, key=lambda i: (-scores[g, i, e], i))
      per_expert.append(ranked[:k])
    lists.append(per_expert)
  return lists


def token_choice_lists(scores: np.ndarray, valid: np.ndarray, top_k: int,
                       capacity: int) -> Lists:
  """scores [G, N, E]; valid [G, N]. Each expert keeps its first `capacity` choosers."""
  g_count, n, e_count = scores.shape
  lists = []
  for g in range(g_count):
    choosers = [[] for _ in range(e_count)]
    for i in range(n):
      if valid[g, i]:
        for e in sorted(range(e_count), key=lambda e: (-scores[g, i, e], e))[:top_k]:
          choosers[e].append(i)
    lists.append([c[:capacity] for c in choosers])
  return lists


def plan_lists(plan: routing.RoutingPlan, num_groups: int, num_tokens: int) -> Lists:
  """Reads a fast RoutingPlan back as explicit lists[g][e]."""
  token_index = np.asarray(plan.token_index)
  sizes = np.asarray(plan.rows_per_expert)
  e_count = sizes.shape[0]
  if plan.capacity is None:
    expert_of_row = np.searchsorted(np.cumsum(sizes), np.arange(token_index.shape[0]),
                                    side='right')
  else:
    expert_of_row = np.arange(token_index.shape[0]) // plan.capacity
  lists = [[[] for _ in range(e_count)] for _ in range(num_groups)]
  for r, tok in enumerate(token_index):
    if tok < num_groups * num_tokens:
      lists[tok // num_tokens][expert_of_row[r]].append(int(tok % num_tokens))
  return lists


def expert_lists(params, x, modality, valid, config) -> Lists:
  """The reference routing decision of `experts.RoutedExperts` (no router noise).

  params: the module's parameters (router_{group} used). Returns lists[g][e] over all
  experts of all groups, in the stacked-weight order.
  """
  m, spec = config.model, routing_spec.from_config(config)
  n = x.shape[1]
  lists = [[] for _ in range(x.shape[0])]
  for group in spec.groups:
    scores = np.asarray(_scores(params, x, group.name, m.router))
    eligible = np.asarray(valid) & np.isin(np.asarray(modality), group.modalities)
    if m.ffn == 'topk':
      chosen = token_choice_lists(scores, eligible, m.top_k, spec.topk_capacity(n))
    else:
      chosen = expert_choice_lists(scores, eligible[..., None], group.capacity)
    for g, per_expert in enumerate(chosen):
      lists[g].extend(per_expert)
  # Group order -> the stacked order of the weights.
  concat = [s for row in spec.slots for s in row]
  return [[per_group[concat.index(s)] for s in range(len(concat))] for per_group in lists]


def routed_experts(params, x, config, lists: Lists):
  """Reference output of `experts.RoutedExperts` for a decision: y [G, N, D].

  y[g, n] = sum over experts e that took n of score_e(x) * SwiGLU_e(x). Differentiable
  in params and x (the decision is piecewise constant and given).
  """
  m, spec = config.model, routing_spec.from_config(config)
  y = jnp.zeros(x.shape, jnp.float32)
  for group, slots in zip(spec.groups, spec.slots):
    scores = _scores(params, x, group.name, m.router)
    for g in range(x.shape[0]):
      for e in range(group.experts):
        ex = slots[e]
        idx = np.asarray(lists[g][ex], np.int32)
        if idx.size == 0:
          continue
        out = swiglu(x[g, idx], params['wi_0'][ex], params['wi_1'][ex], params['wo'][ex])
        y = y.at[g, idx].add(scores[g, idx, e][:, None] * out)
  return y.astype(x.dtype)


def _scores(params, x, group_name, kind):
  logits = jnp.einsum('gnd,de->gne', x.astype(jnp.float32), params[f'router_{group_name}'])
  return routing.router_scores(logits, kind)


def depth_lists(scores: np.ndarray, modality: np.ndarray, valid: np.ndarray,
                capacity: float, num_modalities: int, modality_aware: bool) -> list[list[int]]:
  """Mixture-of-depths picks per group, in increasing token order. scores [G, N]."""
  c = routing_spec.as_fraction(capacity)
  picks = []
  for g in range(scores.shape[0]):
    pools = ([[i for i in range(scores.shape[1]) if valid[g, i] and modality[g, i] == m]
              for m in range(num_modalities)] if modality_aware else
             [[i for i in range(scores.shape[1]) if valid[g, i]]])
    chosen = []
    for pool in pools:
      ranked = sorted(pool, key=lambda i: (-scores[g, i], i))
      chosen += ranked[:math.ceil(c * len(pool))]
    picks.append(sorted(chosen))
  return picks


def depth_block(block_apply, router_w, x, modality, segment_ids, positions, config,
                rows_per_group, picks: list[list[int]] | None = None):
  """Reference of `depth.DepthRoutedBlock`: runs `block_apply` on exactly the picked
  tokens of each routing group (no padding slots). x [B, L, D] -> ([B, L, D], picks).

  block_apply(x [1, P, D], modality, segment_ids, positions) -> [1, P, D]. Pass
  `picks` to differentiate.
  """
  b, l, d = x.shape
  s = rows_per_group
  g_count, n = b // s, s * l
  logits = jnp.einsum('bld,d->bl', x.astype(jnp.float32), router_w)
  weight = jax.nn.sigmoid(logits).reshape(g_count, n)
  valid = np.asarray(segment_ids) > 0
  mod = config.model.mod
  if picks is None:
    picks = depth_lists(np.asarray(weight), np.asarray(modality).reshape(g_count, n),
                        valid.reshape(g_count, n), mod.capacity,
                        len(config.model.modalities), mod.modality_aware)
  seq = np.arange(b)[:, None]
  seg_key = np.where(valid, seq * (l + 1) + np.asarray(segment_ids), 0).reshape(g_count, n)
  xg = x.reshape(g_count, n, d)
  out = xg
  for g, idx in enumerate(picks):
    if not idx:
      continue
    idx = np.asarray(idx)
    sub = lambda a: jnp.asarray(np.asarray(a).reshape(g_count, n)[g, idx][None])
    y = block_apply(xg[g, idx][None], sub(modality), jnp.asarray(seg_key[g, idx][None]),
                    sub(positions))[0]
    out = out.at[g, idx].add(weight[g, idx][:, None] * (y - xg[g, idx]))
  return out.reshape(b, l, d), picks
