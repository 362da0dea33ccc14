"""Every size routing derives from a config, computed once: the `RoutingSpec`.

`from_config(config)` reads `config.model` and `config.routing` and returns a frozen,
hashable spec that the modules, the FLOPs count (moma_jax/analysis/flops.py) and
upcycling (moma_jax/training/upcycle.py) read instead of the ConfigDict: the expert
groups with their exact fractional capacities and expected shares, the order of the
experts in the stacked weights, and, for N tokens per routing group, the candidate
slots K, the rows of the ragged layout, the capacity layout's buffer, the
expert-parallel buffer and mixture-of-depths' picked slots.

Axis legend: G routing groups, N tokens per group, E experts (all groups), E_i experts
of group i, K candidate slots per expert, C rows per expert and group.
"""
from __future__ import annotations

import dataclasses
import fractions
import math

import ml_collections
import numpy as np

Fraction = fractions.Fraction


def as_fraction(c: float) -> Fraction:
  """A capacity as a small exact fraction, so that ceil(c * b) is integer arithmetic."""
  return Fraction(c).limit_denominator(4096)


def ceil_frac(c: Fraction, n):
  """ceil(c * n) in exact integer arithmetic; n an int or an integer array (the routing
  functions' token counts b, traced or not)."""
  return -((-c.numerator * n) // c.denominator)


@dataclasses.dataclass(frozen=True)
class ExpertGroup:
  """One expert group: a name ('text', 'image', ...; 'all' for moe/topk), the modality
  ids it serves, its experts, its capacity c (expert choice: each expert takes ceil(c*b)
  of the b eligible tokens) and the expected share of a routing group's tokens it sees."""
  name: str
  modalities: tuple[int, ...]
  experts: int
  capacity: Fraction
  share: Fraction


@dataclasses.dataclass(frozen=True)
class RoutingSpec:
  """The routing sizes of one model (see the module docstring); `groups` is empty for a
  dense FFN. `slots[i][j]` is the stack position of expert j of group i; `order[s]` the
  group-concatenated index of stack position s."""
  ffn: str                                  # 'dense' | 'moma' | 'moe' | 'topk'
  groups: tuple[ExpertGroup, ...]
  slots: tuple[tuple[int, ...], ...]
  order: tuple[int, ...]
  group_size: int                           # sequences per routing group
  layout: str                               # 'ragged' | 'capacity'
  buffer_factor: Fraction                   # routing.buffer_factor
  ep_buffer_factor: float | None            # routing.ep_buffer_factor (None: exact)
  top_k: int                                # token choice only
  topk_capacity_factor: Fraction            # model.topk_capacity_factor
  mod_capacity: Fraction                    # c_d of mixture-of-depths layers
  mod_per_modality: bool                    # mod.modality_aware
  num_modalities: int
  expected_fractions: tuple[float, ...]     # each modality's expected share of a group

  @property
  def num_experts(self) -> int:
    return sum(g.experts for g in self.groups)

  @property
  def token_choice(self) -> bool:
    return self.ffn == 'topk'

  @property
  def rows_per_token(self) -> int:
    """The most rows one token can occupy: top_k, or the largest expert group."""
    if self.token_choice:
      return self.top_k
    return max((g.experts for g in self.groups), default=1)

  def topk_capacity(self, n: int) -> int:
    """Token choice: tokens an expert keeps per group, ceil(cf * k * N / E), at most N."""
    e = self.groups[0].experts
    return min(n, ceil_frac(self.topk_capacity_factor * self.top_k / e, n))

  def candidates(self, n: int) -> tuple[int, ...]:
    """K_i per group: candidate slots of each expert, min(N, ceil(c_i * N)) for expert
    choice, the per-expert capacity for token choice."""
    if self.token_choice:
      return (self.topk_capacity(n),)
    return tuple(min(n, ceil_frac(g.capacity, n)) for g in self.groups)

  def ragged_rows(self, n: int) -> int:
    """Rows per routing group in the ragged layout: enough for every wanted row.

    Expert choice: sum_i E_i * ceil(c_i * b_i) <= max_i(c_i * E_i) * N + E, and never
    more than sum_i E_i * ceil(c_i * N). Token choice: min(N * k, E * C).
    """
    if self.token_choice:
      return min(n * self.top_k, self.groups[0].experts * self.topk_capacity(n))
    worst = sum(g.experts * k for g, k in zip(self.groups, self.candidates(n)))
    bound = ceil_frac(max(g.capacity * g.experts for g in self.groups), n) + self.num_experts
    return min(worst, bound)

  def buffer_capacity(self, n: int, factor: Fraction | float | None = None) -> int:
    """Rows per expert and group in the capacity layout (the largest over groups).

    Expert choice: ceil(factor * c_i * expected share of group i's tokens * N), factor
    `routing.buffer_factor` unless given.
    """
    if self.token_choice:
      return self.topk_capacity(n)
    factor = self.buffer_factor if factor is None else as_fraction(factor)
    best = 1
    for g in self.groups:
      best = max(best, min(n, ceil_frac(factor * g.capacity * g.share, n)))
    return best

  def ep_buffer_rows(self, n: int, k: int, groups: int) -> int:
    """C: rows a device sends each expert under expert parallelism, for `groups`
    routing groups of N tokens whose experts have K candidate slots each.

    `ep_buffer_factor` None: all G*K (exact, nothing cut); a factor f:
    ceil(f * G * the rows an expert expects per group) (the capacity layout's rule at
    factor 1), at most G*K.
    """
    exact = groups * min(k, self.buffer_capacity(n) if self.layout == 'capacity' else k)
    if self.ep_buffer_factor is None:
      return exact
    return max(1, min(exact, math.ceil(self.ep_buffer_factor * groups
                                       * self.buffer_capacity(n, 1.0))))

  def ep_send_rows(self, n: int, groups: int, capacity: int) -> int:
    """S: static rows a device sends under expert parallelism, in the ragged layout, for
    `groups` routing groups of N tokens when an expert takes at most C = `capacity`
    rows from it: every row its groups can route (`ragged_rows`), at most E * C."""
    return min(groups * self.ragged_rows(n), self.num_experts * capacity)

  def ep_received_rows(self, n: int, groups: int, buffers: int) -> int:
    """R_recv: rows one device's experts can receive under expert parallelism from the
    `groups` routing groups of N tokens that each of the X devices of its expert row
    holds, at most `buffers` (X * E_x * C, the buffers it is sent).

    Expert choice: the device holds E_i / X experts of each group i (the stack
    interleaves groups), each taking ceil(c_i * b_i) <= c_i * b_i + 1 rows of a group,
    so from X * groups groups it receives at most groups * `ragged_rows(N)`. Token
    choice has no such bound (tokens may all pick one device's experts): the buffers.
    """
    if self.token_choice:
      return buffers
    return min(buffers, groups * self.ragged_rows(n))

  def picked_slots(self, n: int) -> int:
    """P: mixture-of-depths' static slots per routing group, enough for every token it
    may pick. Over all modalities ceil(c_d * b) <= ceil(c_d * N); per modality
    sum_m ceil(c_d * b_m) <= ceil(c_d * N) + M - 1."""
    extra = self.num_modalities - 1 if self.mod_per_modality else 0
    return min(n, ceil_frac(self.mod_capacity, n) + extra)


def _expected_fractions(m: ml_collections.ConfigDict, routing: ml_collections.ConfigDict):
  """Each modality's expected share of a routing group's tokens: given, or for moma in
  proportion to the groups' experts, else equal."""
  if routing.expected_fraction is not None:
    return tuple(routing.expected_fraction)
  if m.ffn == 'moma':
    total = sum(int(e) for e in m.experts)
    return tuple(int(e) / total for e in m.experts)
  return (1.0 / len(m.modalities),) * len(m.modalities)


def _groups(m: ml_collections.ConfigDict, fractions_: tuple[float, ...]):
  if m.ffn == 'dense':
    return ()
  if m.ffn == 'moma':
    served = [((i,), name, int(e)) for i, (name, e) in enumerate(zip(m.modalities, m.experts))]
  else:
    served = [(tuple(range(len(m.modalities))), 'all', int(m.experts[0]))]
  if m.capacity is None:
    caps = [1.0 / e for _, _, e in served]
  elif len(m.capacity) == 1:
    caps = [m.capacity[0]] * len(served)
  else:
    caps = list(m.capacity)
  return tuple(
      ExpertGroup(name, mods, e, as_fraction(c),
                  as_fraction(min(1.0, sum(fractions_[i] for i in mods))))
      for (mods, name, e), c in zip(served, caps))


def _slots(groups: tuple[ExpertGroup, ...]) -> tuple[tuple[int, ...], ...]:
  """Experts ordered by their fractional rank (j + 1/2) / E_i (ties by group): for any
  X dividing every E_i, stack positions [k*E/X, (k+1)*E/X) hold exactly E_i/X experts
  of each group i, so an `expert` mesh axis of size X spreads every group evenly."""
  keys = sorted((Fraction(2 * j + 1, 2 * g.experts), i, j)
                for i, g in enumerate(groups) for j in range(g.experts))
  slots = [[0] * g.experts for g in groups]
  for position, (_, i, j) in enumerate(keys):
    slots[i][j] = position
  return tuple(tuple(row) for row in slots)


def from_config(config: ml_collections.ConfigDict) -> RoutingSpec:
  """The spec of a config (its `model` and `routing` blocks)."""
  m, r = config.model, config.routing
  shares = _expected_fractions(m, r)
  groups = _groups(m, shares)
  slots = _slots(groups)
  flat = [s for row in slots for s in row]
  return RoutingSpec(
      ffn=m.ffn, groups=groups, slots=slots,
      order=tuple(int(i) for i in np.argsort(np.asarray(flat, np.int64))) if flat else (),
      group_size=int(r.group_size), layout=r.layout,
      buffer_factor=as_fraction(r.buffer_factor),
      ep_buffer_factor=r.ep_buffer_factor, top_k=int(m.top_k),
      topk_capacity_factor=as_fraction(m.topk_capacity_factor),
      mod_capacity=as_fraction(m.mod.capacity), mod_per_modality=bool(m.mod.modality_aware),
      num_modalities=len(m.modalities), expected_fractions=shares)
