"""The decoder: every variant trains (finite loss and gradients), causality, statistics."""
import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from moma_jax.model import route_stats, transformer

B, L = 4, 16


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  seg = np.ones((B, L), np.int32)
  seg[1, 10:] = 2
  seg[3, 12:] = 0
  pos = np.zeros((B, L), np.int32)
  for b in range(B):
    for s in np.unique(seg[b]):
      where = np.flatnonzero(seg[b] == s)
      pos[b, where] = np.arange(where.size)
  return dict(tokens=jnp.asarray(rng.integers(0, config.model.vocab_size, (B, L)), jnp.int32),
              modality=jnp.asarray(rng.integers(0, 2, (B, L)), jnp.int8),
              segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos),
              loss_mask=jnp.asarray(seg > 0, jnp.int32))


VARIANTS = {
    'dense': dict(ffn='dense'),
    'moma_1t1i': dict(experts=(1, 1)),
    'moma_4t4i_pre_norm': dict(experts=(4, 4), norm='pre'),
    'moe_8x_softmax_gumbel': dict(ffn='moe', experts=(8,), router='softmax', router_noise='gumbel'),
    'topk': dict(ffn='topk', experts=(4,), top_k=2),
    'mod_dense_remat': {'ffn': 'dense', 'mod.enabled': True, 'remat': 'block_input'},
    'mod_moma_4t4i_aware': {'mod.enabled': True, 'mod.modality_aware': True},
    'mod_topk_bf16': {'ffn': 'topk', 'experts': (4,), 'mod.enabled': True, 'dtype': 'bfloat16'},
}


@pytest.mark.parametrize('name', VARIANTS)
def test_every_variant_runs_forward_and_backward(name):
  overrides = dict(VARIANTS[name])
  config = tiny_config(**overrides)
  config.model.num_layers = 2
  model = transformer.build(config)
  params, axes = transformer.init(model, jax.random.key(0))
  batch = random_batch(config)

  @jax.jit
  def step(params):
    grad_fn = jax.value_and_grad(lambda p: transformer.loss_fn(model, p, batch, jax.random.key(1)),
                                 has_aux=True)
    (objective, metrics), grads = grad_fn(params)
    return objective, metrics, grads, route_stats.router_grad_norms(grads)

  objective, metrics, grads, norms = step(params)
  assert np.isfinite(objective)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  # Untrained model over a vocabulary of V: the loss is near log V for each modality.
  for key in ('loss', 'loss/text', 'loss/image'):
    assert abs(float(metrics[key]) - np.log(config.model.vocab_size)) < 1.5, key
  assert int(metrics['tokens']) == int(metrics['tokens/text']) + int(metrics['tokens/image'])
  # Every parameter carries logical axis names, one per dimension.
  for p, spec in zip(jax.tree.leaves(params), jax.tree.leaves(
      axes, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))):
    assert len(spec) == p.ndim
  if config.model.ffn != 'dense':
    assert 'route/experts_per_token' in metrics or 'route/layer0/mod/experts_per_token' in metrics
    assert any(k.startswith('route/grad_norm/') for k in norms)
    assert all(float(v) > 0 for k, v in norms.items() if k.startswith('route/grad_norm/'))
  if config.model.mod.enabled:
    assert 'route/mod/picked' in metrics


def test_route_statistics_are_consistent():
  config = tiny_config(experts=(4, 4))
  model = transformer.build(config)
  params, _ = transformer.init(model, jax.random.key(0))
  batch = random_batch(config)
  _, metrics = jax.jit(lambda p: transformer.loss_fn(model, p, batch))(params)
  hist = np.asarray(metrics['route/experts_per_token'])
  assert hist.shape == (5,) and abs(hist.sum() - 1) < 1e-6
  valid = np.asarray(batch['segment_ids']) > 0
  mod = np.asarray(batch['modality'])
  # Each expert of group m takes ceil(b_m / 4) of each routing group (2 rows per group).
  expect = []
  for m in range(2):
    per_group = [-(-int((valid & (mod == m))[g * 2:(g + 1) * 2].sum()) // 4) for g in range(2)]
    expect += [np.mean(per_group)] * 4
  np.testing.assert_allclose(metrics['route/tokens_per_expert'], expect)
  # Left behind = tokens of the modality whose count in the histogram is 0.
  left = [float(metrics['route/left_behind/text']), float(metrics['route/left_behind/image'])]
  shares = [(valid & (mod == m)).sum() / valid.sum() for m in range(2)]
  np.testing.assert_allclose(hist[0], np.dot(left, shares), rtol=1e-5)


def logits_fn(config):
  model = transformer.build(config)
  params, _ = transformer.init(model, jax.random.key(0))
  return jax.jit(lambda b: model.apply({'params': params}, b['tokens'], b['modality'],
                                       b['segment_ids'], b['positions']))


def change_future(batch, t, token_delta=1):
  """The batch with token t of every row changed."""
  b = dict(batch)
  b['tokens'] = batch['tokens'].at[:, t].set((batch['tokens'][:, t] + token_delta) % 64)
  return b


@pytest.mark.parametrize('overrides', [dict(ffn='dense'), dict(experts=(1, 1))], ids=['dense', '1t1i'])
def test_dense_and_1t1i_are_causal(overrides):
  config = tiny_config(**overrides)
  logits = logits_fn(config)
  batch = random_batch(config)
  base = logits(batch)
  real = np.asarray(batch['segment_ids'] > 0)   # padding outputs are never used
  for t in (5, 9, 15):
    changed = logits(change_future(batch, t))
    np.testing.assert_allclose(changed[:, :t][real[:, :t]], base[:, :t][real[:, :t]],
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(changed[:, t], base[:, t])


@pytest.mark.parametrize('overrides', [dict(experts=(2, 2)), {'ffn': 'dense', 'mod.enabled': True}],
                         ids=['expert_choice_2t2i', 'mod'])
def test_group_level_routing_is_not_causal(overrides):
  """Documents a property of the method: expert choice and MoD see the future.

  A later token can displace an earlier one from an expert (or from the block),
  which changes the earlier token's output. Causal inference needs auxiliary routers.
  """
  config = tiny_config(**overrides)
  logits = logits_fn(config)
  batch = random_batch(config)
  base = logits(batch)
  real = np.asarray(batch['segment_ids'] > 0)
  moved = 0
  for t in range(8, 16):
    for delta in (1, 7, 23):
      changed = logits(change_future(batch, t, delta))
      moved += int(not np.allclose(changed[:, :t][real[:, :t]], base[:, :t][real[:, :t]],
                                   atol=1e-5))
  assert moved > 0


@functools.lru_cache(maxsize=None)
def _remat_case(remat: str):
  """(loss, gradients, residuals saved for the backward pass) of a tiny one-layer
  model under `model.remat` (remat inside mixture-of-depths layers: the variant
  'mod_dense_remat' above)."""
  config = tiny_config(ffn='dense', remat=remat)
  model = transformer.build(config)
  params, _ = transformer.init(model, jax.random.key(0))
  batch = random_batch(config)
  loss = lambda p: transformer.loss_fn(model, p, batch)[0]
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(loss, params)
  return value, grads, out.getvalue().splitlines()


@pytest.mark.parametrize('remat', ['block_input', 'matmuls', 'block_outputs', 'offload'])
def test_remat_policies_keep_loss_and_gradients(remat):
  value, grads, saved = _remat_case(remat)
  ref_value, ref_grads, ref_saved = _remat_case('none')
  assert float(value) == float(ref_value)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               grads, ref_grads)
  # Each policy keeps fewer residuals than none; the named outputs where it says so.
  assert len(saved) < len(ref_saved)
  named = [s for s in saved if 'attention_out' in s or 'ffn_out' in s]
  if remat in ('block_outputs', 'offload'):   # offload saves on device on a CPU
    assert named, saved
  else:
    assert not named, named


def test_run_mode_is_one_record_that_in_mode_changes():
  """The decoder and every layer take one RunMode; decoding needs causal routing."""
  from moma_jax.model.run_mode import RunMode
  with pytest.raises(ValueError, match='needs causal mode'):
    RunMode(decode=True)
  model = transformer.build(tiny_config(), aux_routers=True)
  decoder = model.in_mode(causal=True, decode=True)
  assert decoder.mode == RunMode(aux_routers=True, causal=True, decode=True)
  assert model.mode == RunMode(aux_routers=True)            # in_mode makes a new decoder
  assert (decoder.config, decoder.spec) == (model.config, model.spec)


def test_training_step_weights_the_z_loss_by_train_z_loss():
  """train.z_loss reaches the objective through the training step (the model does not
  carry it): the step's gradient norm at weight w is that of loss_fn's objective at w."""
  import optax
  from moma_jax.training import optimizer as optimizer_lib
  from moma_jax.training import step as step_lib
  config = tiny_config(ffn='dense')
  config.train.batch_size = B
  model = transformer.build(config)
  params, _ = transformer.init(model, jax.random.key(0))
  batch = random_batch(config)
  norms = {}
  for w in (0.0, 0.5):
    config.train.z_loss = w
    tx = optimizer_lib.optimizer(config)
    fresh = jax.tree.map(jnp.copy, params)              # the step donates its state
    _, metrics = step_lib.make_train_step(model, tx, config)(
        {'params': fresh, 'opt': tx.init(fresh)}, batch, jnp.int32(1))
    g = jax.jit(jax.grad(lambda p: transformer.loss_fn(model, p, batch, z_loss=w)[0]))(params)
    norms[w] = float(optax.global_norm(g))
    np.testing.assert_allclose(float(metrics['grad_norm']), norms[w], rtol=1e-5)
  assert abs(norms[0.5] - norms[0.0]) > 1e-3 * norms[0.0]
