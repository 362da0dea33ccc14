"""The causal path of routed experts: every expert on every token, weighted.

In causal mode (evaluation and decoding, moma_jax/model/routers.py: `CausalChoice`) a
token's experts are decided token by token, so no static plan of rows exists ahead of
the decisions. Every expert runs on every token and the decisions weight the results:
E times the FFN's FLOPs, meant for evaluation and decoding at small sizes.

Axis legend: G routing groups, N tokens per group, D embed, E experts (stacked order),
F SwiGLU hidden.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def every_expert_ffn(x: jax.Array, w: jax.Array, wi_0: jax.Array, wi_1: jax.Array,
                     wo: jax.Array) -> jax.Array:
  """y = sum_e w[..., e] * SwiGLU_e(x).

  x [G, N, D]; w [G, N, E] decision weights (0 where a token does not go), in the
  weights' stacked order; wi_* [E, D, F], wo [E, F, D] -> y [G, N, D].
  """
  h = nn.silu(jnp.einsum('gnd,edf->gnef', x, wi_0)) * jnp.einsum('gnd,edf->gnef', x, wi_1)
  out = jnp.einsum('gnef,efd->gned', h, wo)
  return jnp.einsum('gne,gned->gnd', w.astype(out.dtype), out)
