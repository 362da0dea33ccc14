"""Building blocks of the decoder: RMSNorm, RoPE, causal attention with QK-norm, SwiGLU.

Axis legend: B batch (or routing groups), T tokens per row, D embed, H heads, K head dim
(D = H * K), F SwiGLU hidden width.
Every parameter carries logical axis names (`nn.with_logical_partitioning`) and
activations are constrained by name, so `moma_jax.model.sharding` maps names onto a mesh
without touching the modules.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moma_jax.model import attention_kernels
from moma_jax.model import kernels

Dtype = jnp.dtype

default_kernel_init = nn.initializers.lecun_normal()


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Names the activation's axes for sharding; a no-op without axis rules in scope."""
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  """y = x / rms(x) * scale, computed in float32 over the last axis."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: str = 'embed'
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotary position embedding (rotate-half form).

  x: [B, T, H, K]; positions: [B, T] int. Returns [B, T, H, K] in x's dtype.
  Pair (i, i + K/2) is rotated by angle position * base^(-2i/K).
  """
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None, None] * inv_freq     # [B, T, 1, K/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Projection(nn.Module):
  """x [..., *I] -> [..., *O] with a kernel [*I, *O] (I the last `in_dims` axes of x).

  Like `nn.DenseGeneral`, the kernel's initial scale uses the fan-in over all of I; unlike
  it, the kernel is initialized in its own shape, so its logical sharding (`axes`)
  applies under a mesh (DenseGeneral initializes a flat 2-d kernel and fails there).
  """
  out_shape: tuple[int, ...]
  axes: tuple[str, ...]
  in_dims: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[-self.in_dims:]
    n_in, n_out = len(in_shape), len(self.out_shape)
    init = nn.initializers.lecun_normal(in_axis=tuple(range(n_in)),
                                        out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param('kernel', nn.with_logical_partitioning(init, self.axes),
                        (*in_shape, *self.out_shape), self.param_dtype)
    return jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n_in)


class Attention(nn.Module):
  """Multi-head causal self-attention with QK-norm and RoPE.

  x [B, T, D], positions [B, T], segment_ids [B, T] (0 = padding) -> [B, T, D].

  attention: `model.attention` ('auto' | 'xla' | 'splash' | 'flash' | 'cudnn' |
  'tokamax'), resolved for the platform being traced for (moma_jax/model/kernels.py);
  the backends compute the same function (moma_jax/model/attention_kernels.py).
  decode: keys and values live in a cache of `cache_len` slots (the 'cache' collection,
  made by the first call): each call appends its T tokens after those of the calls
  before it and attends to every cached key of the same segment up to its own slot. A
  key whose segment is 0 is never attended to (mixture-of-depths caches the tokens that
  skip its layer that way). Decoding always runs the XLA attention.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = 'xla'
  decode: bool = False
  cache_len: int = 0

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    d = x.shape[-1]
    k_dim = d // self.num_heads

    def proj(name):
      return Projection((self.num_heads, k_dim), ('embed', 'heads', 'kv'), dtype=self.dtype,
                        param_dtype=self.param_dtype, name=name)

    q, k, v = proj('query')(x), proj('key')(x), proj('value')(x)       # [B, T, H, K]
    # QK-norm (Chameleon): keeps attention logits bounded in mixed-modal training.
    q = RMSNorm(self.dtype, self.param_dtype, axis_name='kv', name='query_norm')(q)
    k = RMSNorm(self.dtype, self.param_dtype, axis_name='kv', name='key_norm')(k)
    q, k = rope(q, positions), rope(k, positions)
    q = constrain(q, ('batch', 'length', 'heads', 'kv'))
    k = constrain(k, ('batch', 'length', 'heads', 'kv'))
    if self.decode:
      k, v, mask = self._cached(k, v, segment_ids)
      out = attention_kernels.softmax_attention(q, k, v, mask, self.dtype)
    else:
      out = attention_kernels.attend(q, k, v, segment_ids,
                                     kernels.resolve_attention(self.attention))
    out = Projection((d,), ('heads', 'kv', 'embed'), in_dims=2, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='out')(out)
    return constrain(out, ('batch', 'length', 'embed'))

  def _cached(self, k, v, segment_ids):
    """Appends k, v [B, T, H, K] at the cache's next T slots; returns the whole cache
    [B, S, H, K] (S = cache_len) and the mask [B, 1, T, S]."""
    b, t, h, kd = k.shape
    zeros = lambda shape, dtype: lambda: jnp.zeros(shape, dtype)
    ck = self.variable('cache', 'cached_key', zeros((b, self.cache_len, h, kd), k.dtype))
    cv = self.variable('cache', 'cached_value', zeros((b, self.cache_len, h, kd), v.dtype))
    cs = self.variable('cache', 'cached_segment_ids', zeros((b, self.cache_len), jnp.int32))
    ci = self.variable('cache', 'cache_index', zeros((), jnp.int32))
    i = ci.value
    ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, i, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, i, 0, 0))
    cs.value = jax.lax.dynamic_update_slice(cs.value, segment_ids.astype(jnp.int32), (0, i))
    ci.value = i + t
    q_slot = i + jnp.arange(t)
    seen = jnp.arange(self.cache_len)[None, :] <= q_slot[:, None]            # [T, S]
    seg = segment_ids.astype(jnp.int32)
    same = seg[:, :, None] == cs.value[:, None, :]                          # [B, T, S]
    mask = seen[None] & same & (seg[:, :, None] > 0)
    return ck.value, cv.value, mask[:, None]


def swiglu(x: jax.Array, wi_0: jax.Array, wi_1: jax.Array, wo: jax.Array) -> jax.Array:
  """SwiGLU on rows: x [..., D], wi_* [D, F], wo [F, D] -> [..., D]."""
  return (nn.silu(x @ wi_0) * (x @ wi_1)) @ wo


class MLP(nn.Module):
  """Dense SwiGLU feed-forward: x [..., D] -> [..., D], hidden width F."""
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    init_in = nn.with_logical_partitioning(default_kernel_init, ('embed', 'mlp'))
    init_out = nn.with_logical_partitioning(default_kernel_init, ('mlp', 'embed'))
    wi_0 = self.param('wi_0', init_in, (d, self.hidden), self.param_dtype)
    wi_1 = self.param('wi_1', init_in, (d, self.hidden), self.param_dtype)
    wo = self.param('wo', init_out, (self.hidden, d), self.param_dtype)
    cast = lambda w: w.astype(self.dtype)
    return swiglu(x.astype(self.dtype), cast(wi_0), cast(wi_1), cast(wo))
