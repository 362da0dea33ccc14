"""The jnp/XLA references every kernel must equal, in one place.

Axis legend: G groups, N tokens per group, E experts, K slots, R rows, C rows per
expert, D embed, F hidden, T tokens, S rows per token.

  expert_choice_reference(scores [G, N, E], eligible, k) -> idx, gate [G, E, K]
  gather_rows_reference(x [T, D], token_index [R]) -> rows [R, D]
  swiglu_capacity_reference(rows [E, C, D], wi_0, wi_1, wo) -> [E, C, D]
  swiglu_ragged_reference(rows [R, D], group_sizes [E], wi_0, wi_1, wo) -> [R, D]
  combine_rows_reference(out [R, D], weight [R], token_index [R], T) -> y [T, D]

They restate `moma_jax.model.routing` / `experts` in jax alone (this package imports
only jax and numpy); tests/test_pallas_kernels.py checks them against those too.
"""
from __future__ import annotations

from pallas_kernels.combine import combine_rows_reference
from pallas_kernels.dispatch import gather_rows_reference
from pallas_kernels.grouped_matmul import swiglu_capacity_reference
from pallas_kernels.grouped_matmul import swiglu_ragged_reference
from pallas_kernels.selection import expert_choice_reference

__all__ = ['expert_choice_reference', 'gather_rows_reference', 'swiglu_capacity_reference',
           'swiglu_ragged_reference', 'combine_rows_reference']
