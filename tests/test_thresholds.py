"""Compute-matched causal thresholds (moma_jax/inference/thresholds.py)."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from moma_jax.inference import thresholds
from moma_jax.model import aux_router
from moma_jax.model import param_names
from moma_jax.model import routing_spec
from moma_jax.model import transformer
from moma_jax.runs import evaluation


def test_quantile_thresholds_leave_the_capacity_above():
  logits = np.arange(16, dtype=np.float64)[:, None] * np.asarray([[1.0, -1.0]])  # [16, 2]
  eligible = np.ones((16, 1), bool)
  eligible[12:] = False                             # 12 eligible tokens, values 0..11
  t = thresholds.quantile_thresholds(logits, eligible, 0.25)
  assert t.shape == (1, 2)
  above = (logits[:12] > t[0]).sum(0)
  np.testing.assert_array_equal(above, [3, 3])      # 0.25 of 12 in each column
  # Capacity 1 takes every token; a row without eligible tokens keeps 0.
  assert np.all(thresholds.quantile_thresholds(logits, eligible, 1.0) == -np.inf)
  none = thresholds.quantile_thresholds(logits, np.zeros((16, 1), bool), 0.5)
  np.testing.assert_array_equal(none, 0)


def _perfect_routers(params):
  """Auxiliary routers whose logits equal the main routers' logits:
  SiLU(u) - SiLU(-u) = u, so W1 = [w, -w] and W2 = [1, -1] per output reproduce x w."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  for path in thresholds.router_paths(params):
    *parent, name = path
    if name == param_names.aux_router():
      w = flat[(*parent, param_names.MOD_ROUTER)][:, None]                  # [D, 1]
    else:
      group = name[len(param_names.aux_router()) + 1:]
      w = flat[(*parent, param_names.expert_router(group))]                # [D, E]
    d, e = w.shape
    w1 = np.zeros((d, d // 2), np.float32)
    w2 = np.zeros((d // 2, e), np.float32)
    for j in range(e):
      w1[:, 2 * j], w1[:, 2 * j + 1] = w[:, j], -w[:, j]
      w2[2 * j, j], w2[2 * j + 1, j] = 1.0, -1.0
    flat[(*path, 'w1')], flat[(*path, 'w2')] = jnp.asarray(w1), jnp.asarray(w2)
  return flax.traverse_util.unflatten_dict(flat)


def _batch(b, l, seed):
  """One batch whose modality counts make every capacity an integer (each sequence half
  text, half image, shuffled; no padding) and whose tokens are all different: the first
  layer's router sees embeddings only, and equal tokens would tie."""
  rng = np.random.default_rng(seed)
  modality = np.stack([rng.permutation(np.repeat([0, 1], l // 2)) for _ in range(b)])
  tokens = rng.permutation(np.arange(5, 5 + b * l)).reshape(b, l)
  return dict(tokens=jnp.asarray(tokens), modality=jnp.asarray(modality),
              segment_ids=jnp.ones((b, l), jnp.int32),
              positions=jnp.tile(jnp.arange(l, dtype=jnp.int32), (b, 1)),
              targets=jnp.asarray(np.roll(tokens, -1, 1)), loss_mask=jnp.ones((b, l)))


@pytest.mark.parametrize('ffn, experts, overrides', [
    ('moma', (2, 2), {'num_layers': 2, 'vocab_size': 80}),   # two groups, two layers
    ('moe', (4,), {'num_layers': 2, 'vocab_size': 80,        # a MoD layer, experts inside
                   'mod.enabled': True}),
    ('moma', (2, 2), {'vocab_size': 80, 'mod.enabled': True,  # thresholds per modality
                      'mod.modality_aware': True}),
])
def test_perfect_routers_make_calibrated_causal_routing_teacher_forced(ffn, experts,
                                                                       overrides):
  config = tiny_config(ffn, experts, **overrides)
  config.routing.group_size = config.train.batch_size      # one routing group: the batch
  spec = routing_spec.from_config(config)
  model = transformer.build(config, aux_routers=True)
  params, _ = transformer.init(model, jax.random.key(1))
  params = _perfect_routers(params)
  batch = _batch(config.train.batch_size, config.data.seq_len, seed=3)
  calibrated = thresholds.calibrate(model, params, spec, [batch])
  assert any(np.any(v != 0) for v in thresholds.read(calibrated).values())

  # metrics: 'loss' is the CE. Compiled: eagerly every op of the model compiles alone.
  loss = jax.jit(lambda m, p: transformer.loss_fn(m, p, batch)[1], static_argnums=0)
  teacher = loss(model, calibrated)
  causal = model.in_mode(causal=True)
  matched_metrics = loss(causal, calibrated)
  half = loss(causal, thresholds.at_half(calibrated))
  for key in ('loss', 'loss/text', 'loss/image'):
    np.testing.assert_allclose(matched_metrics[key], teacher[key], rtol=1e-5, err_msg=key)
  # The paper's p > 0.5 takes other tokens than expert choice: the check can fail.
  assert abs(float(half['loss']) - float(teacher['loss'])) > 1e-4
  # Each expert took exactly its capacity of its group's eligible tokens.
  for key, value in matched_metrics.items():
    if '/causal_share/' in key:
      group = key.rsplit('/', 1)[-1]
      cap = next(float(g.capacity) for g in spec.groups if g.name == group)
      np.testing.assert_allclose(value, cap, rtol=1e-6, err_msg=key)


def test_at_half_zeroes_only_the_thresholds():
  config = tiny_config('moma', (2, 2))
  model = transformer.build(config, aux_routers=True)
  params, _ = transformer.init(model, jax.random.key(0))
  flat = flax.traverse_util.flatten_dict(params)
  shifted = flax.traverse_util.unflatten_dict(
      {k: v + 1.0 if k[-1] == aux_router.THRESHOLD else v for k, v in flat.items()})
  back = flax.traverse_util.flatten_dict(thresholds.at_half(shifted))
  for k, v in back.items():
    np.testing.assert_array_equal(v, 0 if k[-1] == aux_router.THRESHOLD else flat[k])


def test_mean_losses_pool_tokens_before_dividing():
  config = tiny_config('moma', (2, 2))
  model = transformer.build(config, aux_routers=True)
  params, _ = transformer.init(model, jax.random.key(0))
  full = _batch(config.train.batch_size, config.data.seq_len, seed=1)
  part = dict(_batch(config.train.batch_size, config.data.seq_len, seed=2))
  part['loss_mask'] = part['loss_mask'].at[:, config.data.seq_len // 4:].set(0.0)
  step = evaluation.make_eval_step(model, config.model.modalities)
  got = evaluation.mean_losses(step, params, [full, part], config.model.modalities, 'm')
  per = [jax.device_get(step(params, b)) for b in (full, part)]
  for key in ('loss', 'loss/text', 'loss/image'):
    n = [float(p['tokens' + key[4:]]) for p in per]
    want = sum(float(p[key]) * k for p, k in zip(per, n)) / sum(n)
    assert n[0] != n[1]                           # unequal weights: the mean is pooled
    np.testing.assert_allclose(got[f'm/{key}'], want, rtol=1e-6)
