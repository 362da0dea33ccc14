"""Rematerialization: what each decoder layer keeps for the backward pass (`model.remat`).

Every layer is wrapped in `nn.remat` with a policy naming what it saves; the rest is
recomputed in the backward pass from the layer's input, which is always kept:

  'none'           everything the backward pass reads (no remat: most memory)
  'block_input'    only each layer's input: the whole layer runs twice (least memory)
  'matmuls'        the outputs of matmuls without batch dimensions (projections,
                   FFN and expert matmuls); norms, RoPE, softmax and routing recomputed
  'block_outputs'  each layer's attention output and FFN output (named in
                   moma_jax/model/block.py), enough to rebuild the residual stream
  'offload'        the same two outputs, moved to host memory during the forward pass
                   and back for the backward pass, where the platform has host memory
                   kinds for it (TPU, GPU); on CPU device memory is host memory, and
                   'offload' saves them as 'block_outputs' does

Gradients equal those of 'none' for every policy (tests/test_model.py).
"""
from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name
import pallas_kernels

from moma_jax import configs

# The names block.py gives the two outputs of a layer.
ATTENTION_OUT, FFN_OUT = 'attention_out', 'ffn_out'


def name(x: jax.Array, label: str) -> jax.Array:
  """x, tagged for the remat policies (a no-op outside `jax.checkpoint`)."""
  return checkpoint_name(x, label)


def policy(remat: str, platform: str | None = None):
  """The `jax.checkpoint` policy of `model.remat` on `platform` (None: the one being
  traced for); None for 'block_input' (save nothing but the input)."""
  if remat not in configs.REMAT or remat == 'none':
    raise ValueError(f'model.remat: no policy for {remat!r}; one of {configs.REMAT[1:]}')
  outputs = (ATTENTION_OUT, FFN_OUT)
  platform = platform or pallas_kernels.backend()
  if remat == 'block_input':
    return None
  if remat == 'matmuls':
    return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
  if remat == 'offload' and platform in ('tpu', 'gpu'):
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(outputs),
        offload_src='device', offload_dst='pinned_host')
  return jax.checkpoint_policies.save_only_these_names(*outputs)
