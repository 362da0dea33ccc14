"""Names that mark the parts of a step in its compiled program, declared once.

A module's name and a `jax.named_scope` both become a prefix of the `op_name` that
every HLO instruction traced inside them carries, so `moma-compile` can say which part
of a step the bytes it moves belong to (moma_jax/analysis/hlo_parts.py). The modules
and scopes below are named with these constants; nothing else parses op names.

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

from moma_jax.model import param_names

ATTENTION = 'attention'
DENSE_FFN = 'mlp'
EXPERTS = param_names.EXPERTS
EXPERT_FFN = 'expert_ffn'
ROUTING = 'routing'
OUTPUT = 'output'
LOSS = 'loss'
OPTIMIZER = 'optimizer'
