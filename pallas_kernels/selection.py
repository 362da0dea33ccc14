"""Expert-choice selection: each expert takes its top-K eligible tokens of a group.

Axis legend: G routing groups, N tokens per group, E experts, K slots per expert.

`expert_choice(scores, eligible, k)` returns exactly what
`moma_jax.model.routing.expert_choice(scores, eligible, capacity)` returns as (idx,
gate) when its K (= min(N, ceil(c * N))) equals `k` (its default selector,
`routing.top_candidates(scores, eligible, k)`), bit for bit:
  idx  [G, E, K] int32: per expert, tokens in order of preference — larger score first,
       ties towards the lower token index, ineligible tokens (score treated as -inf)
       after every eligible one; slots past the number of eligible tokens hold the
       ineligible tokens in index order, as `jax.lax.top_k` over -inf-masked scores does;
  gate [G, E, K] float32: the score of the token in the slot, 0 where the masked score
       is not finite (ineligible tokens; scores that are themselves +-inf or NaN).
Floats are compared in IEEE total order (-NaN < -inf < ... < -0.0 < 0.0 < ... < inf <
NaN), which is how XLA's top_k orders them, so even special values land where the
reference puts them.

Kernel design (`_select_kernel`): grid (G, E), one program per (group, expert) holding
that expert's N scores (padded to a power of two Np; padding is marked taken before the
first round, so it is never chosen). Scores become int32 total-order keys (a bit
trick: flip the magnitude bits of negative floats), then K rounds of
  best = max key among free tokens; at = lowest free index with key == best;
  slot k <- (at, score); mark `at` taken.
Each round is exact and tie-correct by construction (the lowest index wins among
equals); the cost is O(K * N) per program, fine for routing groups of a few thousand
tokens (for a group of 8 x 4096 tokens and K = N / 4 the XLA sort behind top_k scales
better; the benchmark shows where). The results are carried as [Kp] vectors and stored
once (no dynamic-offset stores), which keeps the kernel within what Triton and
interpret mode both lower. On TPU the model takes the XLA reference (`impl='xla'`).

Gradient (`jax.custom_vjp`, backward in jnp/XLA): idx has none; gate's cotangent is
scattered back to scores[g, idx, e] where the gate was finite (where the reference's
`top_k` + `where(isfinite)` sends it). `eligible` gets none.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common


def expert_choice_reference(scores: jax.Array, eligible: jax.Array, k: int):
  """jnp reference: (idx [G, E, K] int32, gate [G, E, K] float32); see module doc.

  scores [G, N, E] float32; eligible [G, N, E] or [G, N, 1] bool; k static, <= N.
  """
  masked = jnp.where(eligible, scores, -jnp.inf)
  gate, idx = jax.lax.top_k(jnp.swapaxes(masked, 1, 2), k)
  return idx.astype(jnp.int32), jnp.where(jnp.isfinite(gate), gate, 0.0)


def _total_order_key(x: jax.Array) -> jax.Array:
  """float32 -> int32 with the same order as IEEE totalOrder (an involution on bits)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _from_key(key: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(key ^ ((key >> 31) & 0x7FFFFFFF), jnp.float32)


def _select_kernel(scores_ref, eligible_ref, idx_ref, gate_ref, *, n: int, k: int):
  """One (group, expert): scores_ref, eligible_ref [Np]; idx_ref, gate_ref [Kp]."""
  n_pad, k_pad = scores_ref.shape[0], idx_ref.shape[0]
  masked = jnp.where(eligible_ref[...] != 0, scores_ref[...], -jnp.inf)
  key = _total_order_key(masked)
  pos = jax.lax.broadcasted_iota(jnp.int32, (n_pad,), 0)
  slot = jax.lax.broadcasted_iota(jnp.int32, (k_pad,), 0)
  lowest = jnp.iinfo(jnp.int32).min

  def round_(j, carry):
    free, idx, gate = carry
    # A real key may equal `lowest` (a -NaN); `at` still only looks at free tokens.
    best = jnp.max(jnp.where(free, key, lowest))
    at = jnp.min(jnp.where(free & (key == best), pos, n_pad))
    value = _from_key(best)
    value = jnp.where(jnp.abs(value) < jnp.inf, value, 0.0)   # isfinite, NaN -> 0
    return (free & (pos != at), jnp.where(slot == j, at, idx),
            jnp.where(slot == j, value, gate))

  init = (pos < n, jnp.zeros((k_pad,), jnp.int32), jnp.zeros((k_pad,), jnp.float32))
  _, idx, gate = jax.lax.fori_loop(0, k, round_, init)
  idx_ref[...] = idx
  gate_ref[...] = gate


def _select_pallas(scores, eligible, k: int, interpret: bool):
  g, n, e = scores.shape
  n_pad, k_pad = _common.next_pow2(n), _common.next_pow2(k)
  # [G, E, N]: each program reads one contiguous row (one XLA transpose of the scores).
  s = _common.pad_to(jnp.swapaxes(scores.astype(jnp.float32), 1, 2), 2, n_pad)
  el = _common.pad_to(jnp.swapaxes(eligible.astype(jnp.int8), 1, 2), 2, n_pad)
  shared = el.shape[1] == 1     # [G, N, 1] eligibility: every expert reads row 0
  row = lambda gi, ei: (gi, ei, 0)
  out = pl.BlockSpec((None, None, k_pad), row)
  idx, gate = pl.pallas_call(
      functools.partial(_select_kernel, n=n, k=k),
      grid=(g, e),
      in_specs=[pl.BlockSpec((None, None, n_pad), row),
                pl.BlockSpec((None, None, n_pad),
                             (lambda gi, ei: (gi, 0, 0)) if shared else row)],
      out_specs=[out, out],
      out_shape=[jax.ShapeDtypeStruct((g, e, k_pad), jnp.int32),
                 jax.ShapeDtypeStruct((g, e, k_pad), jnp.float32)],
      interpret=interpret,
      # Long rows need more threads to hold them (Triton keeps a block in registers).
      compiler_params=_common.compiler_params(num_warps=min(16, max(4, n_pad // 2048))),
      # K rounds, each a max and a min over the Np keys (compares, no matmul FLOPs).
      cost_estimate=_common.cost(2 * g * e * k * n_pad,
                                 _common.nbytes(s, el) + 8 * g * e * k_pad),
      name='expert_choice_select',
  )(s, el)
  return idx[..., :k], gate[..., :k]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _select(scores, eligible, k, interpret):
  return _select_pallas(scores, eligible, k, interpret)


def _select_fwd(scores, eligible, k, interpret):
  idx, gate = _select_pallas(scores, eligible, k, interpret)
  masked = jnp.where(eligible, scores, -jnp.inf)
  picked = jnp.take_along_axis(jnp.swapaxes(masked, 1, 2), idx, axis=-1)
  return (idx, gate), (idx, jnp.isfinite(picked), scores.shape)


def _select_bwd(k, interpret, residuals, cotangents):
  del k, interpret
  idx, finite, shape = residuals
  _, d_gate = cotangents
  g, _, e = shape
  d = jnp.where(finite, d_gate, 0.0).astype(jnp.float32)
  gi = jnp.arange(g)[:, None, None]
  ei = jnp.arange(e)[None, :, None]
  d_scores = jnp.zeros(shape, jnp.float32).at[gi, idx, ei].add(d)
  return d_scores, None


_select.defvjp(_select_fwd, _select_bwd)


def expert_choice(scores: jax.Array, eligible: jax.Array, k: int, *, impl: str = 'pallas',
                  interpret: bool | None = None):
  """Per expert, its top-k eligible tokens of each group (Pallas); see module doc.

  Args:
    scores: [G, N, E] float32 router scores.
    eligible: [G, N, E] or [G, N, 1] bool.
    k: static K <= N, slots per expert.
    impl: 'pallas' or 'xla' (the reference; what the model takes on TPU, where this
      1-D row-per-program kernel is untested under Mosaic and top_k is a fast sort).
    interpret: None = interpret mode on CPU, compiled on GPU/TPU.
  Returns:
    idx [G, E, K] int32, gate [G, E, K] float32 (differentiable w.r.t. scores).
  """
  n = scores.shape[1]
  if not 0 < k <= n:
    raise ValueError(f'k={k} must be in [1, N={n}]')
  if impl == 'xla':
    return expert_choice_reference(scores, eligible, k)
  eligible = jnp.broadcast_to(eligible, scores.shape[:2] + eligible.shape[2:])
  return _select(scores.astype(jnp.float32), eligible.astype(bool), int(k),
                 _common.use_interpret(interpret))
