"""Exact properties of the building blocks and the loss."""
import jax
import jax.numpy as jnp
import numpy as np

from moma_jax.model import attention_kernels
from moma_jax.model import layers
from moma_jax.model.loss import next_token_loss


def test_rope_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
  score = lambda pq, pk: jnp.sum(layers.rope(q, jnp.array([[pq]])) * layers.rope(k, jnp.array([[pk]])))
  np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4)
  np.testing.assert_allclose(score(0, 0), jnp.sum(q * k), rtol=1e-5)
  assert not np.isclose(score(7, 3), score(7, 5))


def test_attention_mask_is_causal_within_segments():
  seg = jnp.array([[1, 1, 2, 2, 0]])
  mask = np.asarray(attention_kernels.attention_mask(seg))[0, 0]
  expect = np.array([[1, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0],
                     [0, 0, 1, 0, 0],
                     [0, 0, 1, 1, 0],
                     [0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(mask, expect)


def test_attention_ignores_other_segments():
  attn = layers.Attention(num_heads=2)
  x = jax.random.normal(jax.random.key(0), (1, 6, 8))
  seg = jnp.array([[1, 1, 1, 2, 2, 2]])
  pos = jnp.array([[0, 1, 2, 0, 1, 2]])
  params = attn.init(jax.random.key(1), x, pos, seg)
  y = attn.apply(params, x, pos, seg)
  y2 = attn.apply(params, x.at[:, 3:].set(0.5), pos, seg)
  np.testing.assert_allclose(y[:, :3], y2[:, :3], rtol=1e-6)
  # A document's output does not depend on where it sits in the packed row.
  y3 = attn.apply(params, x[:, 3:], pos[:, 3:], jnp.ones((1, 3), jnp.int32))
  np.testing.assert_allclose(y[:, 3:], y3, rtol=1e-5, atol=1e-6)


def test_rmsnorm_normalizes():
  x = jnp.array([[3.0, 4.0]])
  y = layers.RMSNorm().apply({'params': {'scale': jnp.ones(2)}}, x)
  np.testing.assert_allclose(y, x / np.sqrt(12.5), rtol=1e-5)


def test_loss_is_booked_to_the_target_modality():
  v = 4
  # Row: t0(text) t1(image) t2(image) | new document t3(text) ; pad
  tokens = jnp.array([[0, 1, 2, 3, 0]])
  modality = jnp.array([[0, 1, 1, 0, 0]], jnp.int8)
  seg = jnp.array([[1, 1, 1, 2, 0]])
  batch = dict(tokens=tokens, modality=modality, segment_ids=seg,
               loss_mask=jnp.array([[0, 1, 1, 1, 0]]))
  logits = jnp.zeros((1, 5, v)).at[0, 0, 1].set(2.0)   # position 0 predicts token 1 well
  objective, m = next_token_loss(logits, batch, ('text', 'image'), z_loss=0.0)
  good = np.log(np.exp(2.0) + 3) - 2.0
  uniform = np.log(4.0)
  # Targets: t1 (image, good), t2 (image, uniform); t3 starts a new document: no target.
  np.testing.assert_allclose(m['loss/image'], (good + uniform) / 2, rtol=1e-6)
  assert int(m['tokens/text']) == 0 and float(m['loss/text']) == 0.0
  np.testing.assert_allclose(m['loss'], (good + uniform) / 2, rtol=1e-6)
  np.testing.assert_allclose(objective, m['loss'], rtol=1e-6)
  z_objective, zm = next_token_loss(logits, batch, ('text', 'image'), z_loss=1e-2)
  lse = np.array([np.log(np.exp(2.0) + 3), np.log(4.0)])
  np.testing.assert_allclose(zm['z_loss'], np.mean(lse ** 2), rtol=1e-6)
  np.testing.assert_allclose(z_objective, m['loss'] + 1e-2 * np.mean(lse ** 2), rtol=1e-6)
