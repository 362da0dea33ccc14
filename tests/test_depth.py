"""Mixture-of-depths: the fast block equals running the block on exactly the picked tokens."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import jit_vjp, tiny_config
from moma_jax.model.block import Block
from moma_jax.model.depth import DepthRoutedBlock
from moma_jax.model import names
from moma_jax.model import routing_spec
import routing_reference as ref

B, L, D = 4, 16, 32


def depth_inputs(seed=0):
  """x [B, L, D]; packed rows with several documents, padding and tied tokens."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, L, D)).astype(np.float32)
  seg = np.ones((B, L), np.int32)
  seg[0, 8:13], seg[0, 13:] = 2, 0           # two documents, then padding
  seg[3, 5:] = 0                              # mostly padding
  pos = np.zeros((B, L), np.int32)
  for b in range(B):
    for s in np.unique(seg[b]):
      where = np.flatnonzero(seg[b] == s)
      pos[b, where] = np.arange(where.size)
  mod = rng.integers(0, 2, size=(B, L)).astype(np.int8)
  mod[1] = 1                                  # a sequence of image tokens only
  x[2, 4:9] = x[2, 3]                         # tied router scores
  mod[2, 4:9] = mod[2, 3]
  return tuple(map(jnp.asarray, (x, mod, seg, pos)))


@pytest.mark.parametrize('variant', [
    dict(ffn='dense', aware=False),
    dict(ffn='dense', aware=True),
    dict(ffn='moma', experts=(2, 2), aware=True),
    dict(ffn='moe', experts=(4,), aware=False),
], ids=str)
def test_depth_block_equals_reference(variant):
  variant = dict(variant)
  aware = variant.pop('aware')
  config = tiny_config(**variant, **{'mod.enabled': True, 'mod.modality_aware': aware})
  frozen = ml_collections.FrozenConfigDict(config.model)
  spec = routing_spec.from_config(config)
  x, mod, seg, pos = depth_inputs()
  module = DepthRoutedBlock(frozen, spec, rows_per_group=2)
  params = nn.unbox(jax.jit(module.init)(jax.random.key(0), x, mod, seg, pos)['params'])
  params['router'] = params['router'] * 50    # spread the scores: ties only from duplicates
  inner = Block(frozen, spec, rows_per_group=1)

  @jax.jit     # once per group's count of picked tokens, not once per op
  def block_apply(*args):
    return inner.apply({'params': params['block']}, *args,
                       mutable=list(names.ANALYSIS))[0]

  _, picks = ref.depth_block(block_apply, params['router'], x, mod, seg, pos, config, 2)
  cot = jax.random.normal(jax.random.key(1), x.shape)

  def fast(p, x):
    y, state = module.apply({'params': p}, x, mod, seg, pos,
                            mutable=list(names.ANALYSIS))
    return y, state['intermediates']['plan'][0]

  def slow(p, x):
    def apply_block(*args):
      return inner.apply({'params': p['block']}, *args,
                         mutable=list(names.ANALYSIS))[0]
    return ref.depth_block(apply_block, p['router'], x, mod, seg, pos, config, 2, picks)[0], ()

  y, plan, grads = jit_vjp(fast, cot)(params, x)
  y_ref, _, grads_ref = jit_vjp(slow, cot)(params, x)
  tok = np.asarray(plan.token_index).reshape(2, -1)
  fast_picks = [[int(t) % (2 * L) for t in row if t < 2 * 2 * L] for row in tok]
  assert fast_picks == picks
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # ceil(0.25 * b) per group (or per modality), and skipped tokens pass unchanged.
  valid = np.asarray(seg > 0).reshape(2, -1)
  m = np.asarray(mod).reshape(2, -1)
  for g in range(2):
    if aware:
      want = sum(-(-int((valid[g] & (m[g] == k)).sum()) // 4) for k in range(2))
    else:
      want = -(-int(valid[g].sum()) // 4)
    assert len(picks[g]) == want
  skipped = np.ones((2, 2 * L), bool)
  for g in range(2):
    skipped[g, picks[g]] = False
  np.testing.assert_array_equal(np.asarray(y).reshape(2, 2 * L, D)[skipped],
                                np.asarray(x).reshape(2, 2 * L, D)[skipped])
