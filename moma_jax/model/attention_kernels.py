"""Causal self-attention over packed documents, by backend (`model.attention`).

Every backend computes the same function of q, k, v [B, T, H, K] and segment_ids [B, T]:
query i attends to key j iff j <= i (row order), both are in the same segment, and the
segment is not 0 (padding); softmax(q k^T / sqrt(K)) v over those keys.
  xla     the [B, H, T, T] logits and probabilities, materialized (the reference, and
          what CPUs run);
  splash  the Pallas TPU splash-attention kernel
          (`jax.experimental.pallas.ops.tpu.splash_attention`): causal and segment
          masks by blocks, fully masked blocks skipped, nothing [T, T] in HBM;
  flash   the Pallas GPU (Triton) flash-attention kernel
          (`jax.experimental.pallas.ops.gpu.attention.mha`, deprecated from jax 0.11),
          with segment ids;
  cudnn   cuDNN's fused attention (`jax.nn.dot_product_attention(implementation=
          'cudnn')`): causal in the kernel, documents as a [B, 1, T, T] boolean mask
          (cuDNN has no segment ids here), which is still no [B, H, T, T] tensor;
  tokamax tokamax's GPU attention (`tokamax.dot_product_attention`, its Mosaic GPU,
          Triton or cuDNN kernels, never its XLA one), with the same document mask.
`resolve_attention` in moma_jax/model/kernels.py picks one per platform ('auto': splash
on TPU; on a GPU tokamax, else cudnn; xla on CPU). Padding queries (segment 0) have no
key to attend to; their outputs differ between backends and are never read (no loss, no
routing, no valid query attends to them). The Pallas kernels run in interpret mode on
CPU, which is how the tests compare them with `xla`. Mixture-of-depths blocks call
attention on their picked tokens in position order, with one segment id per (sequence,
document), so the same masks hold there. Decoding with a KV cache stays on `xla`
(moma_jax/model/layers.py).

Under a mesh the kernels run inside `jax.shard_map` over the batch axes (and 'tensor'
for heads): attention is independent per sequence and head, so each device runs its
own shard, exactly.

Axis legend: B batch, T tokens per row, H heads, K head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pallas_kernels
from jax.sharding import PartitionSpec as P

from moma_jax.model import mesh as mesh_lib


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """[B, 1, T, T] bool: query i sees key j iff j <= i, same segment, segment > 0.

  Causality follows row order: a document's tokens appear in order in every row
  (mixture-of-depths keeps the picked tokens in position order, so this still holds).
  """
  t = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal[None] & same & (segment_ids[:, :, None] > 0))[:, None]


def softmax_attention(q, k, v, mask, dtype) -> jax.Array:
  """softmax(q k^T / sqrt(K)) v with logits in float32 and probabilities in `dtype`.

  q [B, T, H, K], k, v [B, S, H, K], mask [B, 1, T, S] -> [B, T, H, K].
  """
  logits = jnp.einsum('bqhk,bshk->bhqs', q, k, preferred_element_type=jnp.float32)
  logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum('bhqs,bshk->bqhk', probs, v)


def _xla(q, k, v, segment_ids):
  return softmax_attention(q, k, v, attention_mask(segment_ids), q.dtype)


def _pad_length(x: jax.Array, t: int, axis: int = 1) -> jax.Array:
  """x with its length axis zero-padded to t (padding is segment 0: never attended)."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, t - x.shape[axis])
  return jnp.pad(x, pad)


def _block(t: int, largest: int = 128) -> tuple[int, int]:
  """(block, padded length): a power-of-two block of at most `largest` (at least 16,
  Triton's smallest tile) and the length rounded up to a multiple of it."""
  block = min(largest, max(16, 1 << (t - 1).bit_length()))
  return block, -(-t // block) * block


def _splash_kernel(t: int, heads: int, block: int, interpret: bool):
  # Made in the trace that uses it: the kernel holds its mask's block tables as arrays.
  # Imported here: the TPU op module pulls in Mosaic, which hosts without it need not.
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=g-import-not-at-top
  mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(heads)])
  # One fused backward kernel (dq with dk, dv): q k^T and do v^T are recomputed once,
  # not twice as with a separate dq kernel.
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        use_fused_bwd_kernel=True)
  return sa.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                            interpret=interpret), sa.SegmentIds


# The splash kernel's blocks: the TPU's 128 lanes, in interpret mode too.
SPLASH_BLOCK = 128


def _splash(q, k, v, segment_ids):
  b, t, h, kd = q.shape
  block, tp = SPLASH_BLOCK, -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
  kernel, segment_ids_t = _splash_kernel(tp, h, block, pallas_kernels.backend() != 'tpu')
  q = q / jnp.sqrt(jnp.asarray(kd, q.dtype))
  q, k, v, seg = (_pad_length(a, tp) for a in (q, k, v, segment_ids.astype(jnp.int32)))
  one = lambda q, k, v, s: kernel(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),
                                  segment_ids=segment_ids_t(q=s, kv=s)).swapaxes(0, 1)
  return jax.vmap(one)(q, k, v, seg)[:, :t]


def _flash(q, k, v, segment_ids):
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # pylint: disable=g-import-not-at-top
  b, t, h, kd = q.shape
  block, tp = _block(t, 64)
  sizes = gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=min(block, 32),
                                   block_kv_dkv=min(block, 32), block_q_dq=min(block, 32),
                                   block_kv_dq=min(block, 32))
  q, k, v, seg = (_pad_length(a, tp) for a in (q, k, v, segment_ids.astype(jnp.int32)))
  out = gpu_attention.mha(q, k, v, seg, sm_scale=float(1 / np.sqrt(kd)), causal=True,
                          block_sizes=sizes, interpret=pallas_kernels.backend() != 'gpu')
  return out[:, :t]


def _document_mask(segment_ids):
  """[B, T] -> bool [B, 1, T, T]: query and key in the same document (not padding)."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same & (segment_ids[:, :, None] > 0))[:, None]


def _cudnn(q, k, v, segment_ids):
  return jax.nn.dot_product_attention(q, k, v, mask=_document_mask(segment_ids),
                                      is_causal=True, implementation='cudnn')


# tokamax's GPU attention kernels, in its order of preference; never its 'xla' ones,
# which materialize the [B, H, T, T] logits.
TOKAMAX_GPU = ('mosaic', 'triton', 'cudnn')


def _tokamax(q, k, v, segment_ids):
  tokamax = pallas_kernels.import_tokamax()
  return tokamax.dot_product_attention(q, k, v, mask=_document_mask(segment_ids),
                                       is_causal=True, implementation=TOKAMAX_GPU)


SPLASH_KERNEL_PREFIX = 'splash_mha'


def splash_flops(sequences: int, length: int, heads: int, head_dim: int,
                 backward: bool) -> float:
  """FLOPs the splash kernels execute for `sequences` rows of `length` tokens: per
  sequence and head, the causal mask's 128 x 128 blocks (nb (nb + 1) / 2 of nb = ceil(
  length / 128), diagonal blocks whole; segment masks are dynamic and skip nothing),
  each 2 matmuls of 2 * 128 * 128 * K forward and 5 in the fused backward (q k^T and
  do v^T recomputed, then dv, dk, dq). XLA's cost analysis sees no FLOPs in these
  kernels, so `moma-compile` adds this count (moma_jax/compilation/compile_report.py)."""
  nb = -(-length // SPLASH_BLOCK)
  matmuls = 2 + (5 if backward else 0)
  return float(sequences * heads * nb * (nb + 1) // 2 * matmuls * 2 * SPLASH_BLOCK**2
               * head_dim)


_KERNELS = {'xla': _xla, 'splash': _splash, 'flash': _flash, 'cudnn': _cudnn,
            'tokamax': _tokamax}


def attend(q, k, v, segment_ids, backend: str) -> jax.Array:
  """Attention of q, k, v [B, T, H, K] under segment_ids [B, T] with `backend` (one of
  'xla', 'splash', 'flash', 'cudnn', 'tokamax', as resolved for the platform) ->
  [B, T, H, K]."""
  fn = _KERNELS[backend]
  if backend == 'xla' or not mesh_lib.is_sharded():
    return fn(q, k, v, segment_ids)
  mesh = jax.sharding.get_abstract_mesh()
  batch = mesh_lib.batch_axes(mesh)
  heads = mesh_lib.TENSOR if mesh.shape.get(mesh_lib.TENSOR, 1) > 1 else None
  qkv = P(batch, None, heads, None)
  # Pallas outputs carry no varying-axes annotation, which the check needs.
  return jax.shard_map(fn, in_specs=(qkv, qkv, qkv, P(batch, None)), out_specs=qkv,
                       check_vma=False)(q, k, v, segment_ids)
