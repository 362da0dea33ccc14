"""The routing operations behind `model.kernels`: XLA ops or our Pallas kernels.

Both sets compute the same functions (tests/test_pallas_kernels.py checks each kernel
against its jnp reference; tests/test_kernel_switch.py a whole training step):
  select(scores [G, N, E], eligible [G, N, E|1], K) -> idx, gate [G, E, K]
  gather(x [T, D], token_index [R]) -> rows [R, D]          (T: a zero row)
  swiglu_blocks(rows [E, C, D], wi_0, wi_1 [E, D, F], wo [E, F, D]) -> [E, C, D]
  swiglu_ragged(rows [R, D], group_sizes [E], wi_0, wi_1, wo) -> [R, D]
  combine(out [R, D], weight [R], token_index [R], T) -> y [T, D]
'xla' does the ragged SwiGLU with `jax.lax.ragged_dot`, except on CPU, where a batched
block per expert plus a loop over its overflow rows computes the same
(moma_jax/model/tiled_swiglu.py).
'pallas' runs compiled (Triton) on GPU and in interpret mode on CPU (slow there: for
tests; the CPU default is 'xla'); on TPU it takes megablox's grouped matmul for the
ragged layout and XLA for the rest (pallas_kernels/__init__.py says why).

Axis legend: G routing groups, N tokens per group, E experts, K candidate slots, T
tokens, R rows, C rows per expert, D embed, F hidden.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import pallas_kernels

from moma_jax.model import routing
from moma_jax.model import tiled_swiglu
from moma_jax.model.layers import swiglu


@dataclasses.dataclass(frozen=True)
class Ops:
  select: Callable
  gather: Callable
  swiglu_blocks: Callable
  swiglu_ragged: Callable
  combine: Callable


def _swiglu_ragged_dot(rows, group_sizes, wi_0, wi_1, wo):
  h = nn.silu(jax.lax.ragged_dot(rows, wi_0, group_sizes)) * jax.lax.ragged_dot(
      rows, wi_1, group_sizes)
  return jax.lax.ragged_dot(h, wo, group_sizes)


def _swiglu_ragged_xla(rows, group_sizes, wi_0, wi_1, wo):
  """The ragged SwiGLU: blocks and tiles on CPU, whose `ragged_dot` runs every expert
  over every row (moma_jax/model/tiled_swiglu.py); `ragged_dot` elsewhere. Chosen when
  the computation is lowered, so a program compiled here for another platform keeps
  `ragged_dot`."""
  return jax.lax.platform_dependent(rows, group_sizes, wi_0, wi_1, wo,
                                    cpu=tiled_swiglu.swiglu_tiled,
                                    default=_swiglu_ragged_dot)


XLA = Ops(
    select=routing.top_candidates,
    gather=lambda x, token_index: jnp.take(x, token_index, axis=0, mode='fill',
                                           fill_value=0),
    swiglu_blocks=jax.vmap(swiglu),
    swiglu_ragged=_swiglu_ragged_xla,
    combine=lambda out, weight, token_index, t: jnp.zeros(
        (t, out.shape[-1]), out.dtype).at[token_index].add(
            out * weight[:, None].astype(out.dtype), mode='drop'))


def ops(kernels: str, rows_per_token: int) -> Ops:
  """The ops of `model.kernels`; rows_per_token: the most rows one token can have (the
  largest expert group, or top_k), which the Pallas gather-based combine needs."""
  if kernels == 'xla':
    return XLA
  return Ops(
      select=pallas_kernels.expert_choice,
      gather=lambda x, token_index: pallas_kernels.gather_rows(
          x, token_index, rows_per_token=rows_per_token),
      swiglu_blocks=pallas_kernels.swiglu_capacity,
      swiglu_ragged=pallas_kernels.swiglu_ragged,
      combine=lambda out, weight, token_index, t: pallas_kernels.combine_rows(
          out, weight, token_index, t, rows_per_token))
