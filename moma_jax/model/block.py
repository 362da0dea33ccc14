"""One decoder block: attention, then a dense or routed FFN, in either norm placement.

'post' (Chameleon's norm re-ordering, the paper's and our default):
    h = x + norm(attn(x));  out = h + norm(ffn(h))
'pre':
    h = x + attn(norm(x));  out = h + ffn(norm(h))
Under 'post' a lone expert's gate is cancelled by the norm (norm(g * f) = norm(f)); under
'pre' the gate scales the residual update directly.

Axis legend: B rows of the batch, T tokens per row, D embed, G routing groups,
N = S * T tokens per routing group (S rows per group).
"""
from __future__ import annotations

import flax.linen as nn

from moma_jax import configs
from moma_jax.model.experts import RoutedExperts
from moma_jax.model.layers import MLP, Attention, RMSNorm, constrain
from moma_jax.model import remat
from moma_jax.model import names
from moma_jax.model.run_mode import DecoderPart


class Block(DecoderPart):
  """x [B, T, D] -> [B, T, D]; routed FFNs see routing groups of `rows_per_group` rows.

  modality [B, T] int, segment_ids [B, T] (0 = padding), positions [B, T].
  config, spec, mode: `DecoderPart` (moma_jax/model/run_mode.py); in decode mode
  attention goes through a KV cache of `model.max_len` slots (`Attention`).
  """
  rows_per_group: int = 1

  @nn.compact
  def __call__(self, x, modality, segment_ids, positions, deterministic: bool = True):
    m = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    post = m.norm == 'post'
    attn = Attention(m.num_heads, attention=m.attention, decode=self.mode.decode,
                     cache_len=m.max_len, name=names.ATTENTION, **kw)
    attn_norm = RMSNorm(name='attention_norm', **kw)
    ffn_norm = RMSNorm(name='ffn_norm', **kw)
    if post:
      h = x + attn_norm(remat.name(attn(x, positions, segment_ids), remat.ATTENTION_OUT))
    else:
      h = x + remat.name(attn(attn_norm(x), positions, segment_ids), remat.ATTENTION_OUT)
    h = constrain(h, ('batch', 'length', 'embed'))
    u = h if post else ffn_norm(h)
    if m.ffn == 'dense':
      f = MLP(configs.ffn_hidden(m), name=names.DENSE_FFN, **kw)(u)
    else:
      b, t, d = u.shape
      # Causal routing looks at one token at a time: any grouping gives the same result.
      s = 1 if self.mode.causal else self.rows_per_group
      # [B, T, D] -> [G, N, D]: a routing group is S consecutive rows of the batch.
      f = RoutedExperts(self.config, self.spec, self.mode, name=names.EXPERTS)(
          u.reshape(b // s, s * t, d), modality.reshape(b // s, s * t),
          (segment_ids > 0).reshape(b // s, s * t), deterministic).reshape(b, t, d)
    f = remat.name(f, remat.FFN_OUT)
    out = h + (ffn_norm(f) if post else f)
    return constrain(out, ('batch', 'length', 'embed'))
