"""Analytic FLOPs and parameter counts, per token and per modality.

Convention, in FLOPs per token of a given modality:
  * training = 3 x forward (the backward pass costs two forwards);
  * forward = 2 x multiply-accumulates of every matmul the token touches:
      - attention projections q, k, v, out: 4 matmuls D x D -> 8 * D^2;
      - causal attention over its context, counted as half the square: QK^T and AV each
        see L/2 keys on average (L = data.seq_len) -> 2 * 2 * (L / 2) * D;
      - SwiGLU: 3 matmuls D x F (F = configs.ffn_hidden) -> 6 * D * F per expert used;
      - routers: a token is scored by the router of each expert group serving its
        modality (2 * D * E_g), and by the scalar router of each MoD layer (2 * D);
      - output head: 2 * D * V;
  * not counted: the embedding lookup (a gather, not a matmul), norms, RoPE, softmax and
    other elementwise work, sort/top-k, and padding or unused rows of static buffers.

Experts a token touches, on average (expected values; ceil() rounding and cut rows are
ignored): moma, a token of modality m goes through E_m * c_m experts of its group
(c from the `RoutingSpec`'s groups, moma_jax/model/routing_spec.py; default 1/E_m:
exactly one expert's worth); moe, E * c; topk, top_k (drops ignored).

Mixture-of-depths layers (`configs.mod_layers`): a token runs the block with probability
c_d, so the layer costs c_d * (projections + FFN or experts + routers inside the block +
attention over the picked context, c_d * L / 2 keys on average) + 2 * D for the MoD
router, which scores every token.

Measured routing (`measured_forward`, causal inference): the same count with each
layer's experts per token and MoD picked shares as measured (`Usage`), plus the
auxiliary routers that decide: D^2 + D * E_g per group serving the token (in a MoD
layer, if picked) and D^2 + D per MoD layer (every token).

"overall" is the mean over modalities weighted by the spec's `expected_fractions`
(the expected modality mix of a routing group).

Parameters: total = embedding V * D + untied output D * V + per layer attention 4 * D^2,
QK-norm 2 * K (K = D / H), two block norms 2 * D, FFN 3 * D * F per expert, routers
D * E per group, D per MoD router; + the final norm D. Equal to the model's parameter
count, exactly. "Active" per token = the expected number of parameters the token's
forward pass uses: embedding, output head and norms in full, plus, per layer,
frac * (attention + the experts and routers it touches) + its MoD router, where frac is
c_d in MoD layers and 1 elsewhere. So forward FLOPs - attention over the context
= 2 * (active - V * D - norms).

Axis legend: D d_model, F SwiGLU hidden width, H heads, K head dim, L data.seq_len,
V vocabulary, E experts of a group, c capacity of a group, c_d MoD capacity.
Pure Python over the config (no JAX), so the count is instant and runs anywhere.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import ml_collections

from moma_jax import configs
from moma_jax.model import routing_spec

# Forward cost components, in the order they are printed.
COMPONENTS = ('attention_proj', 'attention_context', 'ffn', 'routers', 'output')


@dataclasses.dataclass(frozen=True)
class FlopsReport:
  """FLOPs per token and parameter counts of one config.

  forward, train, params_active: {modality name or 'overall': value}.
  forward_breakdown: {modality name or 'overall': {component: forward FLOPs per token}},
    components as in COMPONENTS.
  params_breakdown: {'embedding', 'output', 'attention', 'ffn', 'routers', 'norms':
    parameter count} (sums to params_total).
  num_layers / num_mod_layers: blocks, and how many of them are MoD layers.
  """
  params_total: int
  params_active: dict[str, float]
  params_breakdown: dict[str, int]
  forward: dict[str, float]
  train: dict[str, float]
  forward_breakdown: dict[str, dict[str, float]]
  num_layers: int
  num_mod_layers: int

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------
# Per-layer pieces
# ----------------------------------------------------------------------------------
def _experts_touched(spec: routing_spec.RoutingSpec, modality: int) -> float:
  """Expected experts' worth of SwiGLU a token of `modality` goes through in one layer."""
  if spec.ffn == 'dense':
    return 1.0
  if spec.token_choice:
    return float(spec.top_k)
  return float(sum(g.experts * g.capacity for g in spec.groups if modality in g.modalities))


def _router_width(spec: routing_spec.RoutingSpec, modality: int) -> int:
  """Router outputs that score a token of `modality`: sum of E_g over groups serving it."""
  return sum(g.experts for g in spec.groups if modality in g.modalities)


@dataclasses.dataclass(frozen=True)
class Usage:
  """What a model's routing did, measured layer by layer (causal inference), for token
  modality name m and layer i:
    experts[m][i]  experts' worth of SwiGLU a token goes through (in a MoD layer, a token
                   that runs the block); None: as `count` has it (a dense FFN, token
                   choice);
    picked[m][i]   the share of the modality's tokens that run MoD layer i (1.0 in other
                   layers); picked['all'][i] that share over all tokens, which sets the
                   attention context among picked tokens.
  Counted as if only the chosen experts ran (causal mode computes every expert and
  weights them; that is an implementation, not the model's cost), plus the auxiliary
  routers that make the decisions (`AUX_COMPONENT`)."""
  experts: dict[str, tuple[float | None, ...]]
  picked: dict[str, tuple[float, ...]]


AUX_COMPONENT = 'aux_routers'


def _forward_breakdown(config: ml_collections.ConfigDict, modality: int,
                       usage: Usage | None = None) -> dict[str, float]:
  """Forward FLOPs per token of one modality, by component (see module docstring);
  with `usage`, of the measured routing instead, plus the auxiliary routers."""
  m, spec = config.model, routing_spec.from_config(config)
  d, f, v = m.d_model, configs.ffn_hidden(m), m.vocab_size
  seq = config.data.seq_len
  name = m.modalities[modality]
  out = dict.fromkeys(COMPONENTS, 0.0)
  if usage is not None:
    out[AUX_COMPONENT] = 0.0
  router = 2.0 * d * _router_width(spec, modality)
  # An auxiliary router per expert group: SiLU(x W1) W2, W1 D x D/2, W2 D/2 x E_g.
  aux = sum(d * d + d * g.experts for g in spec.groups if modality in g.modalities
            and not spec.token_choice)
  for i, is_mod in enumerate(configs.mod_layers(m)):
    if usage is None:
      touched = _experts_touched(spec, modality)
      frac = context = float(spec.mod_capacity) if is_mod else 1.0
    else:
      touched = usage.experts[name][i]
      if touched is None:                 # no router decided here (dense, token choice)
        touched = _experts_touched(spec, modality)
      frac = usage.picked[name][i] if is_mod else 1.0
      context = usage.picked['all'][i] if is_mod else 1.0
      out[AUX_COMPONENT] += frac * aux + ((d * d + d) if is_mod else 0.0)
    out['attention_proj'] += frac * 8.0 * d * d
    # Half the square: context * L / 2 keys on average for QK^T and again for AV.
    out['attention_context'] += frac * 2.0 * 2.0 * (context * seq / 2.0) * d
    out['ffn'] += frac * 6.0 * d * f * touched
    out['routers'] += frac * router + (2.0 * d if is_mod else 0.0)
  out['output'] = 2.0 * d * v
  return out


def _params(config: ml_collections.ConfigDict) -> tuple[dict[str, int], dict[str, float]]:
  """(parameter breakdown, active parameters per modality name)."""
  m, spec = config.model, routing_spec.from_config(config)
  d, f, v = m.d_model, configs.ffn_hidden(m), m.vocab_size
  k = d // m.num_heads
  n_experts = spec.num_experts or 1
  layers = configs.mod_layers(m)
  n_layers, n_mod = len(layers), sum(layers)
  norms = n_layers * (2 * k + 2 * d) + d
  breakdown = dict(
      embedding=v * d, output=d * v, attention=n_layers * 4 * d * d,
      ffn=n_layers * n_experts * 3 * d * f,
      routers=n_layers * d * spec.num_experts + n_mod * d,
      norms=norms)
  active = {}
  c_d = float(spec.mod_capacity)
  for i, name in enumerate(m.modalities):
    per_layer = 4 * d * d + 3 * d * f * _experts_touched(spec, i) + d * _router_width(spec, i)
    blocks = sum((c_d if is_mod else 1.0) * per_layer + (d if is_mod else 0)
                 for is_mod in layers)
    active[name] = float(2 * v * d + norms + blocks)
  return breakdown, active


def _overall(config: ml_collections.ConfigDict, per_mod: dict[str, float]) -> float:
  shares = routing_spec.from_config(config).expected_fractions
  total = sum(shares)
  return sum(s * per_mod[name] for s, name in zip(shares, config.model.modalities)) / total


# ----------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------
def count(config: ml_collections.ConfigDict) -> FlopsReport:
  """FLOPs per token and parameter counts of a (valid) config."""
  m = config.model
  names = tuple(m.modalities)
  breakdown = {name: _forward_breakdown(config, i) for i, name in enumerate(names)}
  forward = {name: sum(b.values()) for name, b in breakdown.items()}
  forward['overall'] = _overall(config, forward)
  breakdown['overall'] = {
      comp: _overall(config, {n: breakdown[n][comp] for n in names}) for comp in COMPONENTS}
  params, active = _params(config)
  active['overall'] = _overall(config, active)
  layers = configs.mod_layers(m)
  return FlopsReport(
      params_total=sum(params.values()), params_active=active, params_breakdown=params,
      forward=forward, train={k: 3.0 * v for k, v in forward.items()},
      forward_breakdown=breakdown, num_layers=len(layers), num_mod_layers=sum(layers))


def measured_forward(config: ml_collections.ConfigDict, usage: Usage) -> dict[str, float]:
  """Forward FLOPs per token of the routing `usage` describes, {modality name or
  'overall': FLOPs}, auxiliary routers included, and 'aux_routers[/modality]' their
  share of it. 'overall' weights the modalities as `count` does."""
  names = tuple(config.model.modalities)
  parts = {n: _forward_breakdown(config, i, usage) for i, n in enumerate(names)}
  out = {n: sum(b.values()) for n, b in parts.items()}
  out['overall'] = _overall(config, out)
  aux = {n: b[AUX_COMPONENT] for n, b in parts.items()}
  out[AUX_COMPONENT] = _overall(config, aux)
  out.update({f'{AUX_COMPONENT}/{n}': a for n, a in aux.items()})
  return out


def forward_flops(config: ml_collections.ConfigDict) -> float:
  """Forward FLOPs per token, overall (modalities weighted by their expected share)."""
  return count(config).forward['overall']


def train_flops(config: ml_collections.ConfigDict) -> float:
  """Training FLOPs per token, overall: 3 x forward."""
  return 3.0 * forward_flops(config)


def _with_depth(config: ml_collections.ConfigDict, num_layers: int, *,
                mod: bool, ffn: str | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` with `num_layers` blocks, MoD on or off, and maybe another FFN."""
  if isinstance(config, ml_collections.FrozenConfigDict):
    c = ml_collections.ConfigDict(config)
  else:
    c = copy.deepcopy(config)  # keeps placeholders typed, unlike a to_dict() round trip
  c.model.num_layers = num_layers
  c.model.mod.enabled = mod
  if ffn is not None:
    c.model.ffn = ffn
  return c


def compute_matched_dense(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The dense model of the same width whose forward FLOPs per token are nearest.

  Same vocabulary, width, heads, FFN and sequence length; `ffn='dense'`, MoD off; the
  depth is the one with the nearest overall forward FLOPs per token (ties: the
  shallower). With the paper's capacities (E * c = 1) a non-MoD sparse model gets its own
  depth, routers being a rounding error; a MoD model gets a shallower dense model.
  """
  target = forward_flops(config)
  dense = lambda n: _with_depth(config, n, mod=False, ffn='dense')
  one, two = forward_flops(dense(1)), forward_flops(dense(2))
  per_layer = two - one                  # dense FLOPs are linear in depth
  guess = max(1, round((target - (one - per_layer)) / per_layer))
  best = min((n for n in (guess - 1, guess, guess + 1) if n >= 1),
             key=lambda n: (abs(forward_flops(dense(n)) - target), n))
  return dense(best)


def mod_layers_matching(config: ml_collections.ConfigDict, max_layers: int = 4096) -> int:
  """Depth of the MoD variant of `config` whose forward FLOPs per token are nearest.

  `config` is typically dense; its `model.mod` settings (capacity, every, first,
  modality_aware) describe the MoD variant, which keeps its FFN kind and width. The
  target is `config` with MoD off. Ties go to the shallower model.
  """
  target = forward_flops(_with_depth(config, config.model.num_layers, mod=False))
  prev = None
  for n in range(1, max_layers + 1):
    cost = forward_flops(_with_depth(config, n, mod=True))
    if cost >= target:               # cost grows with depth: the nearest is n - 1 or n
      if prev is not None and target - prev <= cost - target:
        return n - 1
      return n
    prev = cost
  raise configs.ConfigError('model.num_layers',
                            f'no MoD depth up to {max_layers} matches the dense FLOPs')
