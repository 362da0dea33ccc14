"""Parameter names and roles, declared once.

The modules name their parameters with these constants, and every part that treats a
parameter by what it is (routing statistics, the optimizer's separate clipping of
auxiliary routers, upcycling, the auxiliary-router store) asks `role(path)`, so no other
file matches parameter-path substrings.

  role                module / parameter path (inside a layer 'layer_{i}')
  'expert'            .../experts/{wi_0, wi_1, wo}            stacked [E, ...]
  'expert_router'     .../experts/router_{group}              [D, E_group]
  'mod_router'        router  (a mixture-of-depths layer)     [D]
  'aux_router'        .../aux_router_{group}/..., .../aux_router/...
  'other'             everything else (embeddings, attention, norms, dense FFNs)
"""
from __future__ import annotations

from typing import Any, Sequence

EXPERTS = 'experts'                 # the routed-experts module of a block
EXPERT_WEIGHTS = ('wi_0', 'wi_1', 'wo')
MOD_ROUTER = 'router'               # a mixture-of-depths layer's router
MOD_BLOCK = 'block'                 # the block inside a mixture-of-depths layer
AUX_ROUTER = 'aux_router'           # the MoD auxiliary router; expert groups add _{group}
_EXPERT_ROUTER = 'router_'


def expert_router(group: str) -> str:
  """The parameter name of expert group `group`'s router."""
  return f'{_EXPERT_ROUTER}{group}'


def aux_router(group: str | None = None) -> str:
  """The module name of an auxiliary router: of an expert group, or (None) of MoD."""
  return AUX_ROUTER if group is None else f'{AUX_ROUTER}_{group}'


def names(path: Sequence[Any]) -> tuple[str, ...]:
  """A parameter path as names, from names or jax key-path entries (DictKey .key)."""
  return tuple(str(getattr(p, 'key', p)) for p in path)


def role(path: Sequence[Any]) -> str:
  """The role of the parameter at `path` (names or jax key-path entries)."""
  parts = names(path)
  if any(p.startswith(AUX_ROUTER) for p in parts):
    return 'aux_router'
  leaf, module = parts[-1], parts[-2] if len(parts) > 1 else ''
  if module == EXPERTS and leaf in EXPERT_WEIGHTS:
    return 'expert'
  if module == EXPERTS and leaf.startswith(_EXPERT_ROUTER):
    return 'expert_router'
  if leaf == MOD_ROUTER:
    return 'mod_router'
  return 'other'


def router_label(path: Sequence[Any]) -> str | None:
  """What a router's statistics are labelled by: its group for an expert router,
  'mod' for a MoD router, None for any other parameter."""
  kind = role(path)
  if kind == 'expert_router':
    return names(path)[-1][len(_EXPERT_ROUTER):]
  return 'mod' if kind == 'mod_router' else None
