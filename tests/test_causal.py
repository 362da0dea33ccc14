"""Causal mode: no logit depends on a later token; KV-cache decoding equals the full pass."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from moma_jax.model import route_stats
from moma_jax.model import transformer

B, L, CHANGED = 4, 16, 9
# An initialization whose random auxiliary routers give every expert and MoD layer at
# least 10% of its tokens (asserted in the test, not assumed).
INIT_SEED = 3
KINDS = {
    'dense': dict(ffn='dense'),
    'moma_4t4i': dict(),
    'moe_8x': dict(ffn='moe', experts=(8,)),
    'mod_moma_4t4i': dict(mod=True),
}


def _setup(kind):
  over = dict(KINDS[kind])
  mod = over.pop('mod', False)
  c = tiny_config(**over)
  c.model.num_layers = 2
  c.model.mod.enabled = mod
  c.model.max_len = c.data.seq_len = L
  model = transformer.build(c, aux_routers=kind != 'dense')
  rng = np.random.default_rng(1)
  batch = dict(tokens=jnp.asarray(rng.integers(0, c.model.vocab_size, (B, L)), jnp.int32),
               modality=jnp.asarray(rng.integers(0, 2, (B, L)), jnp.int8),
               segment_ids=jnp.ones((B, L), jnp.int32),
               positions=jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)))
  params, _ = transformer.init(model, jax.random.key(INIT_SEED), {**batch, 'loss_mask': batch['tokens']})
  return model, params, batch


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, batch, tokens=None):
  return model.apply({'params': params}, batch['tokens'] if tokens is None else tokens,
                     batch['modality'], batch['segment_ids'], batch['positions'],
                     mutable=['route_stats'])


@pytest.mark.parametrize('kind', ['moma_4t4i', 'moe_8x', 'mod_moma_4t4i'])
def test_causal_mode_never_looks_ahead(kind):
  model, params, batch = _setup(kind)
  causal = model.in_mode(causal=True)
  changed = batch['tokens'].at[:, CHANGED].set((batch['tokens'][:, CHANGED] + 1) % 700)
  before, state = _logits(causal, params, batch)
  after, _ = _logits(causal, params, batch, changed)
  # The routers really route: every expert (MoD layer) takes at least 10% of its tokens
  # in every layer, so an empty or all-skipping routing cannot pass.
  stats = route_stats.summarize(state['route_stats'])
  shares = [np.asarray(v) for k, v in stats.items()
            if k.startswith('route/layer') and ('causal_share/' in k or k.endswith('mod/picked'))]
  assert shares and min(float(s.min()) for s in shares) >= 0.10, shares
  np.testing.assert_array_equal(before[:, :CHANGED], after[:, :CHANGED])
  assert float(jnp.abs(before[:, CHANGED:] - after[:, CHANGED:]).max()) > 1e-3
  # Teacher-forced routing does look ahead (so the comparison above can fail).
  tf_before, _ = _logits(model, params, batch)
  tf_after, _ = _logits(model, params, batch, changed)
  assert float(jnp.abs(tf_before[:, :CHANGED] - tf_after[:, :CHANGED]).max()) > 1e-4


@pytest.mark.parametrize('kind', ['dense', 'moma_4t4i', 'mod_moma_4t4i'])
def test_kv_cache_decoding_equals_the_full_causal_pass(kind):
  model, params, batch = _setup(kind)
  full, _ = _logits(model.in_mode(causal=True), params, batch)
  decoder = model.in_mode(causal=True, decode=True)
  prompt = 5
  cut = lambda a, i, j: a[:, i:j]
  cache = jax.jit(decoder.init)(jax.random.key(0), *(cut(batch[k], 0, prompt) for k in (
      'tokens', 'modality', 'segment_ids', 'positions')))['cache']
  cache = jax.tree.map(jnp.zeros_like, cache)
  step = jax.jit(lambda c, *a: decoder.apply({'params': params, 'cache': c}, *a,
                                             mutable=['cache']))
  pieces, start = [], 0
  for end in (prompt, *range(prompt + 1, L + 1)):      # the prompt at once, then 1 by 1
    out, v = step(cache, *(cut(batch[k], start, end) for k in (
        'tokens', 'modality', 'segment_ids', 'positions')))
    cache, start = v['cache'], end
    pieces.append(out)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, rtol=1e-5, atol=1e-5)


def test_causal_expert_choice_without_aux_routers_is_refused():
  c = tiny_config()
  model = transformer.build(c, aux_routers=False).in_mode(causal=True)
  with pytest.raises(ValueError, match='auxiliary routers'):
    transformer.init(model, jax.random.key(0))
