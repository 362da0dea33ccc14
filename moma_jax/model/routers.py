"""One router per routing kind, over the pure functions of moma_jax/model/routing.py.

A router turns one expert group's scores into a `routing.Selection` (candidates, gates,
how many each expert wants):
  ExpertChoice   each expert takes its top ceil(c * b) eligible tokens (the paper);
  TokenChoice    each token its top-k experts, each expert keeps its first C tokens,
                 plus the Switch/GShard load-balancing loss;
  CausalChoice   causal inference: a token goes to every expert whose auxiliary router
                 says so (expert choice) or to its top-k (token choice), no capacity.
The router weights themselves live in `RoutedExperts` (moma_jax/model/experts.py), one
[D, E_i] matrix per group; `scores` here computes the float32 scores from them.

Axis legend: G routing groups, N tokens per group, D embed, E experts of the group,
K candidate slots per expert.
"""
from __future__ import annotations

import dataclasses
import fractions
from typing import Callable

import jax
import jax.numpy as jnp
from pallas_kernels import references

from moma_jax.model import routing


def scores(x: jax.Array, w_router: jax.Array, kind: str,
           noise_rng: jax.Array | None = None, noise_scaled_to: jax.Array | None = None
           ) -> tuple[jax.Array, jax.Array]:
  """(logits, scores) [G, N, E] float32 from x [G, N, D] and w_router [D, E].

  The router matmul runs in float32 whatever the model dtype: expert choice ranks tokens
  by these scores, and bfloat16's 8 bits of mantissa would turn near-ties into ties,
  which break by token index instead of by score. With `noise_rng`, Gumbel-sigmoid
  noise; with `noise_scaled_to` too ([G, N] bool, the eligible tokens), the noise is
  scaled to each expert's logit spread over them (`routing.noise_scaled_to_logits`).
  """
  logits = jnp.einsum('gnd,de->gne', x.astype(jnp.float32), w_router.astype(jnp.float32))
  scale = (None if noise_scaled_to is None
           else routing.noise_scaled_to_logits(logits, noise_scaled_to))
  return logits, routing.router_scores(logits, kind, noise_rng, scale)


@dataclasses.dataclass(frozen=True)
class ExpertChoice:
  """Expert choice within a group of capacity c: see `routing.expert_choice`."""
  capacity: fractions.Fraction
  select: Callable = references.expert_choice_reference   # `Ops.select`

  def __call__(self, scores: jax.Array, eligible: jax.Array) -> routing.Selection:
    """scores [G, N, E], eligible [G, N] bool -> Selection [G, E, K]."""
    return routing.expert_choice(scores, eligible[..., None], self.capacity,
                                 select=self.select)


@dataclasses.dataclass(frozen=True)
class TokenChoice:
  """Token choice top-k with `capacity` tokens kept per expert and group."""
  top_k: int
  capacity: int

  def __call__(self, scores: jax.Array, eligible: jax.Array):
    """scores [G, N, E], eligible [G, N] bool -> (Selection [G, E, C], the
    load-balancing loss, a scalar)."""
    selection, assign = routing.token_choice(scores, eligible, self.top_k, self.capacity)
    return selection, self.balance_loss(scores, assign, eligible)

  def balance_loss(self, scores, assign, eligible) -> jax.Array:
    """E * sum_e f_e * P_e over the group's valid tokens (f: share of assignments, P:
    mean score), minimal when both are uniform."""
    e = scores.shape[-1]
    count = jnp.maximum(eligible.sum(), 1)
    f = (assign & eligible[..., None]).sum((0, 1)) / (count * self.top_k)
    p = jnp.where(eligible[..., None], scores, 0).sum((0, 1)) / count
    return e * jnp.sum(f * p)


@dataclasses.dataclass(frozen=True)
class CausalChoice:
  """Causal decisions, token by token: no token looks at another.

  Expert choice is replaced by the auxiliary router's decisions (its logit above the
  router's threshold: margin > 0; threshold 0 is a predicted probability of being taken
  > 0.5); token choice keeps its top-k without capacity. The main router's score weights
  the expert either way.
  """
  top_k: int | None = None          # token choice; None: expert choice

  def __call__(self, scores: jax.Array, eligible: jax.Array,
               aux_margins: jax.Array | None) -> jax.Array:
    """scores [G, N, E], eligible [G, N] bool, aux_margins [G, N, E] (expert choice:
    auxiliary logit minus threshold) -> weights [G, N, E]: the score where a token goes
    to an expert, else 0."""
    e = scores.shape[-1]
    if self.top_k is not None:
      top = jax.lax.top_k(scores, self.top_k)[1]                          # [G, N, k]
      take = jax.nn.one_hot(top, e, dtype=jnp.int32).sum(-2) > 0
    else:
      take = aux_margins > 0
    return jnp.where(take & eligible[..., None], scores, 0.0)
