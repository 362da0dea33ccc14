"""Routing statistics: from the sown per-layer values to flat `route/...` metrics.

Modules sow into the 'route_stats' collection (tokens per expert, experts-per-token
histogram, left-behind fractions per modality, dropped fractions, router logit
mean/std, MoD picked fraction). `summarize` averages each statistic over the layers
that have it (`route/{name}`) and keeps per-layer detail (`route/layer{i}/{name}`);
`router_grad_norms` does the same for the gradient norms of router weights.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

_LAYER = re.compile(r'layer_(\d+)')


def _walk(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _walk(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _layer_of(path: tuple[str, ...]) -> int:
  for part in path:
    hit = _LAYER.fullmatch(part)
    if hit:
      return int(hit.group(1))
  return -1


def summarize(route_stats: Mapping[str, Any]) -> dict[str, jax.Array]:
  """{'route/{stat}': mean over layers, 'route/layer{i}/{stat}': layer i's value}."""
  per_stat: dict[str, list[jax.Array]] = {}
  out = {}
  for path, value in _walk(route_stats):
    value = value[0] if isinstance(value, tuple) else value  # sow keeps a tuple
    layer = _layer_of(path)
    prefix = 'mod/' if 'block' in path[:-1] and not path[-1].startswith('mod/') else ''
    stat = prefix + path[-1]
    out[f'route/layer{layer}/{stat}'] = value
    per_stat.setdefault(stat, []).append(value)
  for stat, values in per_stat.items():
    if all(v.shape == values[0].shape for v in values):
      out[f'route/{stat}'] = jnp.mean(jnp.stack(values), axis=0)
  return out


def router_grad_norms(grads: Mapping[str, Any]) -> dict[str, jax.Array]:
  """L2 norms of the router weights' gradients: per router kind, mean over layers.

  Expert routers are params named 'router_{group}'; a MoD router is 'router'.
  """
  per_name: dict[str, list[jax.Array]] = {}
  out = {}
  for path, value in _walk(grads):
    name = path[-1]
    if name == 'router':
      name = 'router_mod'
    elif not name.startswith('router_'):
      continue
    norm = jnp.sqrt(jnp.sum(jnp.square(value.astype(jnp.float32))))
    out[f'route/layer{_layer_of(path)}/grad_norm/{name[len("router_"):]}'] = norm
    per_name.setdefault(name[len('router_'):], []).append(norm)
  for name, values in per_name.items():
    out[f'route/grad_norm/{name}'] = jnp.mean(jnp.stack(values))
  return out
