"""Routing statistics: computed from a layer's selection, sown, summarized as metrics.

`expert_stats` (teacher-forced) and `causal_stats` (causal mode) are pure functions of
what a layer of routed experts decided: tokens per expert (all, and of each modality),
the experts-per-token
histogram, left-behind fractions per modality, dropped fractions, router logit
mean/std (or each expert's causal share). The layer sows them into the 'route_stats'
collection, as mixture-of-depths layers sow their picked fraction. `summarize` averages
each statistic over the layers that have it (`route/{name}`) and keeps per-layer
detail (`route/layer{i}/{name}`); `router_grad_norms` does the same for the gradient
norms of router weights.

Axis legend: G routing groups, N tokens per group, E experts (all groups), E_i experts
of group i, K candidate slots.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp

from moma_jax.model import names
from moma_jax.model import param_names
from moma_jax.model import routing
from moma_jax.model.routing_spec import RoutingSpec

def _walk(tree: Mapping[str, Any]):
  """(path of keys, leaf) of a nested dict (sown values are tuples: leaves here)."""
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()


def summarize(route_stats: Mapping[str, Any]) -> dict[str, jax.Array]:
  """{'route/{stat}': mean over layers, 'route/layer{i}/{stat}': layer i's value}."""
  per_stat: dict[str, list[jax.Array]] = {}
  out = {}
  for path, value in _walk(route_stats):
    value = value[0] if isinstance(value, tuple) else value  # sow keeps a tuple
    layer = names.layer_index(path)
    inside_mod = param_names.MOD_BLOCK in path[:-1]
    prefix = 'mod/' if inside_mod and not path[-1].startswith('mod/') else ''
    stat = prefix + path[-1]
    out[names.route(stat, layer)] = value
    per_stat.setdefault(stat, []).append(value)
  for stat, values in per_stat.items():
    if all(v.shape == values[0].shape for v in values):
      out[names.route(stat)] = jnp.mean(jnp.stack(values), axis=0)
  return out


def router_grad_norms(grads: Mapping[str, Any]) -> dict[str, jax.Array]:
  """L2 norms of the router weights' gradients: per router (expert group, or 'mod'),
  mean over layers (`param_names.router_label`)."""
  per_name: dict[str, list[jax.Array]] = {}
  out = {}
  for path, value in _walk(grads):
    name = param_names.router_label(path)
    if name is None:
      continue
    norm = jnp.sqrt(jnp.sum(jnp.square(value.astype(jnp.float32))))
    out[names.route(f'{names.GRAD_NORM}/{name}', names.layer_index(path))] = norm
    per_name.setdefault(name, []).append(norm)
  for name, values in per_name.items():
    out[names.route(f'{names.GRAD_NORM}/{name}')] = jnp.mean(jnp.stack(values))
  return out


def _left_behind(taken, modality, valid, modalities) -> dict[str, jax.Array]:
  """Per modality, the share of its tokens no expert took; taken [G, N] int."""
  out = {}
  for i, mod in enumerate(modalities):
    of_mod = valid & (modality == i)
    out[f'left_behind/{mod}'] = ((taken == 0) & of_mod).sum() / jnp.maximum(of_mod.sum(), 1)
  return out


def expert_stats(selection: routing.Selection, kept: jax.Array, per_group, spec: RoutingSpec,
                 modality: jax.Array, valid: jax.Array, modalities) -> dict[str, jax.Array]:
  """The statistics of one teacher-forced layer of routed experts.

  selection [G, E, K] stacked; kept [G, E] rows each expert got; per_group: (name,
  logits [G, N, E_i], eligible [G, N]) of each group; modality, valid [G, N].
  """
  g, n = modality.shape
  taken = routing.experts_per_token(selection.idx, kept, n)             # [G, N]
  n_valid = jnp.maximum(valid.sum(), 1)
  # Each expert's taken tokens by modality (mean per group): which modality an expert
  # serves, where the groups do not fix it (moe).
  took = jnp.arange(selection.idx.shape[-1]) < kept[..., None]             # [G, E, K]
  mod_of = jnp.take_along_axis(jnp.broadcast_to(modality[:, None], (g, took.shape[1], n)),
                               jnp.clip(selection.idx, 0, n - 1), axis=-1)  # [G, E, K]
  by_modality = {mod: selection.in_group_order((took & (mod_of == i)).sum(-1)).sum(0) / g
                 for i, mod in enumerate(modalities)}
  wanted, kept = selection.in_group_order(selection.wanted), selection.in_group_order(kept)
  out = {'tokens_per_expert': kept.sum(0) / g}
  out.update({f'tokens_per_expert/{mod}': v for mod, v in by_modality.items()})
  max_e = spec.top_k if spec.token_choice else max(grp.experts for grp in spec.groups)
  out['experts_per_token'] = jnp.stack(
      [((taken == i) & valid).sum() for i in range(max_e + 1)]) / n_valid
  out.update(_left_behind(taken, modality, valid, modalities))
  start = 0
  for group, (name, logits, eligible) in zip(spec.groups, per_group):
    e = group.experts
    want, got = wanted[:, start:start + e].sum(), kept[:, start:start + e].sum()
    start += e
    out[f'dropped/{name}'] = (want - got) / jnp.maximum(want, 1)
    sel = jnp.broadcast_to(eligible[..., None], logits.shape)
    cnt = jnp.maximum(sel.sum(), 1)
    mean = jnp.where(sel, logits, 0).sum() / cnt
    var = jnp.where(sel, (logits - mean) ** 2, 0).sum() / cnt
    out[f'router_logit_mean/{name}'] = mean
    out[f'router_logit_std/{name}'] = jnp.sqrt(var)
  return out


def causal_stats(weights_per_group, per_group, weights: jax.Array, modality: jax.Array,
                 valid: jax.Array, modalities) -> dict[str, jax.Array]:
  """The statistics of one causal layer: each expert's share of its group's eligible
  tokens (`causal_share/{name}` [E_i]) and the left-behind fractions.

  weights_per_group: w [G, N, E_i] per group (0 where a token does not go);
  per_group: (name, logits, eligible [G, N]); weights [G, N, E] all of them.
  """
  out = {}
  for w_i, (name, _, eligible) in zip(weights_per_group, per_group):
    out[f'causal_share/{name}'] = (w_i > 0).sum((0, 1)) / jnp.maximum(eligible.sum(), 1)
  out.update(_left_behind((weights > 0).sum(-1), modality, valid, modalities))
  return out
