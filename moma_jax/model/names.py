"""Every name that crosses a module boundary as a key, declared once.

One module builds these strings and, where a key must be read back, parses them; the
others ask it. What it names:

  scopes       the op_name prefixes that mark the parts of a step in its compiled program
               (moma_jax/analysis/hlo_parts.py reads them)
  collections  what the model sows into, for `apply(..., mutable=...)`
  layers       the decoder's layer modules, 'layer_{i}', and where in them an auxiliary
               router sits (`RouterSite`)
  metrics      the keys of a step's metrics and of a metrics.jsonl row
  shares       the keys of what causal routing took (moma_jax/inference/thresholds.py
               writes them, moma_jax/inference/aux_stage.py reads them)

Parameter names inside a layer, and the role of a parameter by its path, are
moma_jax/model/param_names.py's.

Scopes. A module's name and a `jax.named_scope` both become a prefix of the `op_name`
that every HLO instruction traced inside them carries, so `moma-compile` can say which
part of a step the bytes it moves belong to:

  ATTENTION    a block's attention module (projections, kernels)
  DENSE_FFN    a block's dense SwiGLU module
  EXPERTS      a block's routed-experts module: routers, selection, row gathers,
               the exchange between devices and the combine
  EXPERT_FFN   the experts' grouped (or batched) SwiGLU matmuls, inside EXPERTS
  ROUTING      a mixture-of-depths layer's router, picking, gathers and combine
  OUTPUT       the output projection to the vocabulary
  LOSS         the next-token loss over the logits
  OPTIMIZER    the optimizer's update of the state, and its guard
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from moma_jax.model import param_names

ATTENTION = 'attention'
DENSE_FFN = 'mlp'
EXPERTS = param_names.EXPERTS
EXPERT_FFN = 'expert_ffn'
ROUTING = 'routing'
OUTPUT = 'output'
LOSS = 'loss'
OPTIMIZER = 'optimizer'


# ----------------------------------------------------------------------------------
# Collections the model sows into.
ROUTE_STATS = 'route_stats'          # per-layer routing statistics (route_stats.py)
BALANCE_LOSS = 'balance_loss'        # token choice's load-balancing loss, per layer
INTERMEDIATES = 'intermediates'      # each layer's selection and routing plan
AUX_ROUTER_SCORES = 'aux_router'     # auxiliary routers' cross-entropy and confusion counts
AUX_DECISIONS = 'aux_decisions'      # what causal mode decided, for calibration
# What an analysis of one forward pass asks `apply` for.
ANALYSIS = (INTERMEDIATES, ROUTE_STATS, BALANCE_LOSS)


# ----------------------------------------------------------------------------------
# Layers, and where an auxiliary router sits in them.
_LAYER = 'layer_'


def layer(i: int) -> str:
  """The module name of the decoder's layer `i`."""
  return f'{_LAYER}{i}'


def layer_index(path: Sequence[Any]) -> int:
  """The layer a module or parameter path (names or key-path entries) lies in; -1 for
  one outside every layer (embeddings, the final norm, the output head)."""
  for part in param_names.names(path):
    if part.startswith(_LAYER) and part[len(_LAYER):].isdigit():
      return int(part[len(_LAYER):])
  return -1


@dataclasses.dataclass(frozen=True)
class RouterSite:
  """An auxiliary router's place: layer `layer`; `group` None for a mixture-of-depths
  layer's own router, else the expert group's, inside the layer's MoD block when
  `inside_mod`."""
  layer: int
  group: str | None = None
  inside_mod: bool = False

  @property
  def path(self) -> tuple[str, ...]:
    """The router module's path in the parameters."""
    if self.group is None:
      return (layer(self.layer), param_names.aux_router())
    block = (param_names.MOD_BLOCK,) if self.inside_mod else ()
    return (layer(self.layer), *block, param_names.EXPERTS, param_names.aux_router(self.group))

  @property
  def order(self) -> tuple[int, int]:
    """Forward order: by layer, a MoD layer's router before the routers in its block."""
    return self.layer, len(self.path)

  @classmethod
  def of(cls, path: Sequence[Any]) -> RouterSite:
    """The site of the router module at `path` (`RouterSite.path` read back)."""
    parts = param_names.names(path)
    name = parts[-1]
    group = None if name == param_names.aux_router() else \
        name[len(param_names.aux_router()) + 1:]
    return cls(layer_index(parts), group, param_names.MOD_BLOCK in parts[:-1])


# ----------------------------------------------------------------------------------
# Metric keys: a step's metrics and the rows of metrics.jsonl.
LOSS_METRIC = 'loss'                 # cross-entropy over the batch's targets
TOKENS = 'tokens'                    # targets counted
BATCH_TOKENS = 'batch_tokens'        # a row's targets per modality
Z_LOSS = 'z_loss'
GRAD_NORM = 'grad_norm'
ROUTE = 'route'                      # routing statistics
AUX_ROUTER = 'aux_router'            # auxiliary routers' accuracy and loss
# Per-batch metrics a training row carries under their own keys.
ROW_PREFIXES = (f'{LOSS_METRIC}/', f'{ROUTE}/', f'{AUX_ROUTER}/')


def per_modality(key: str, modality: str) -> str:
  """A metric's value among one modality's tokens: 'loss/text', 'tokens/image'."""
  return f'{key}/{modality}'


def route(stat: str, layer_i: int | None = None) -> str:
  """'route/{stat}' (mean over layers) or 'route/layer{i}/{stat}' (layer i's)."""
  return f'{ROUTE}/{stat}' if layer_i is None else f'{ROUTE}/layer{layer_i}/{stat}'


def aux_router_metric(stat: str, kind: str | None = None) -> str:
  """'aux_router/{stat}' over all routers, or '.../{kind}' for one kind of router."""
  return f'{AUX_ROUTER}/{stat}' + ('' if kind is None else f'/{kind}')


def is_aux_router_metric(key: str) -> bool:
  return key.startswith(f'{AUX_ROUTER}/')


# ----------------------------------------------------------------------------------
# Shares: what causal routing took at a router, pooled over batches.
def share(site: RouterSite, modality: str | None = None) -> str:
  """Each output's share of the router's eligible tokens [E] (of one modality's)."""
  key = 'share/' + '/'.join(site.path)
  return key if modality is None else f'{key}/{modality}'


def eligible(site: RouterSite, modality: str) -> str:
  """How many of a modality's tokens the router decided over."""
  return f'eligible/{"/".join(site.path)}/{modality}'


def taken(site: RouterSite, modality: str) -> str:
  """How many of a modality's tokens each output took [E]."""
  return f'taken/{"/".join(site.path)}/{modality}'
