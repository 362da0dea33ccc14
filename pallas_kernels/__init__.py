"""Pallas kernels for the routing plan: selection, dispatch, grouped expert matmul, combine.

Axis legend: G groups, N tokens per group, E experts, K slots per expert, R rows,
C rows per expert, D embed, F hidden, T tokens, S rows per token.

  expert_choice(scores [G, N, E], eligible [G, N, E|1], k) -> idx, gate [G, E, K]
      (selection.py; equals routing.expert_choice bit for bit)
  gather_rows(x [T, D], token_index [R]) -> rows [R, D]           (dispatch.py)
  swiglu_capacity(rows [E, C, D], wi_0, wi_1 [E, D, F], wo [E, F, D]) -> [E, C, D]
  swiglu_ragged(rows [R, D], group_sizes [E], wi_0, wi_1, wo) -> [R, D]
      (grouped_matmul.py; megablox gmm on TPU for the ragged layout)
  combine_rows(out [R, D], weight [R], token_index [R], T, S) -> y [T, D]
      (combine.py; a gather over `rows_of_token`, the inverse map)

Each op has a jnp reference (`references`, or `<op>_reference` beside it) that it
equals, and a `jax.custom_vjp`. Backend: interpret mode on CPU (the only way Pallas runs
there), compiled (Triton) on GPU. Which implementation runs on which platform is not
decided here: every op takes `impl` ('pallas' by default, or 'xla' for the reference;
the ragged matmul also 'megablox' and 'tokamax'), and the model decides, in one place
per platform (moma_jax/model/kernels.py: on TPU megablox for the ragged matmul and XLA
for the rest, whose Mosaic lowering is untested; on GPU tokamax's grouped matmul or
ours). Every op also takes
`interpret` (None = by backend); `target_backend('tpu' | 'cuda')` makes them trace for
another platform than this machine's (ahead-of-time compiles). Every pallas_call gives
XLA a cost estimate (FLOPs, bytes). Importing this package needs only jax and numpy.
"""
from __future__ import annotations

from pallas_kernels._common import backend
from pallas_kernels._common import import_tokamax
from pallas_kernels._common import target_backend
from pallas_kernels.combine import combine_rows
from pallas_kernels.combine import combine_rows_reference
from pallas_kernels.dispatch import gather_rows
from pallas_kernels.dispatch import gather_rows_reference
from pallas_kernels.grouped_matmul import swiglu_capacity
from pallas_kernels.grouped_matmul import swiglu_capacity_reference
from pallas_kernels.grouped_matmul import swiglu_ragged
from pallas_kernels.grouped_matmul import swiglu_ragged_reference
from pallas_kernels import references
from pallas_kernels.row_kernels import rows_of_token
from pallas_kernels.selection import expert_choice
from pallas_kernels.selection import expert_choice_reference

__all__ = [
    'expert_choice', 'gather_rows', 'swiglu_capacity', 'swiglu_ragged', 'combine_rows',
    'rows_of_token', 'references', 'expert_choice_reference', 'gather_rows_reference',
    'swiglu_capacity_reference', 'swiglu_ragged_reference', 'combine_rows_reference',
    'target_backend', 'backend', 'import_tokamax',
]
