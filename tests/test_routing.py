"""The fast routing (static-shape plans) equals the slow per-expert reference.

Inputs cover: a mixed group with padding, a group with text only (no image token), a
group with images only, a group of padding only, and a group of duplicated tokens
(tied scores for every expert).
"""
import fractions
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import jit_vjp, tiny_config
from moma_jax.model.experts import RoutedExperts
from moma_jax.model import kernels
from moma_jax.model import names
from moma_jax.model import routing
from moma_jax.model import routing_spec
import routing_reference as ref

D = 32
N = 20


def routing_inputs(seed=0, n=N, d=D):
  """x [5, N, D], modality [5, N], valid [5, N] covering the edge cases above."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(5, n, d)).astype(np.float32)
  mod = rng.integers(0, 2, size=(5, n)).astype(np.int8)
  valid = np.ones((5, n), bool)
  valid[0, -5:] = False          # padding at the end of a mixed group
  mod[1] = 0                     # text only
  mod[2] = 1                     # image only
  valid[3] = False               # padding only
  x[4, 6:14] = x[4, 3]           # tied scores: identical tokens...
  mod[4, 6:14] = mod[4, 3]       # ...of the same modality
  return jnp.asarray(x), jnp.asarray(mod), jnp.asarray(valid)


def fast(config, params, x, mod, valid):
  module = RoutedExperts(ml_collections.FrozenConfigDict(config.model),
                         routing_spec.from_config(config))
  y, state = module.apply({'params': params}, x, mod, valid,
                          mutable=list(names.ANALYSIS))
  return y, state['intermediates']['plan'][0], state['route_stats']


def init_params(config, x, mod, valid, seed=1):
  module = RoutedExperts(ml_collections.FrozenConfigDict(config.model),
                         routing_spec.from_config(config))
  # Compiled: run eagerly, every op of the init would compile on its own.
  params = nn.unbox(jax.jit(module.init)(jax.random.key(seed), x, mod, valid)['params'])
  # Larger router weights spread the scores, so ties come only from duplicates.
  return {k: (v * 50 if k.startswith('router_') else v) for k, v in params.items()}


VARIANTS = [
    dict(ffn='moma', experts=(1, 1)),
    dict(ffn='moma', experts=(2, 2)),
    dict(ffn='moma', experts=(4, 4)),
    dict(ffn='moma', experts=(3, 5)),
    dict(ffn='moma', experts=(4, 4), capacity=(0.5, 0.25)),
    dict(ffn='moe', experts=(4,)),
    dict(ffn='moe', experts=(4,), router='softmax'),
    dict(ffn='topk', experts=(4,), top_k=2),
    dict(ffn='topk', experts=(4,), top_k=1, topk_capacity_factor=0.5),  # drops tokens
]


@pytest.mark.parametrize('layout', ['ragged', 'capacity'])
@pytest.mark.parametrize('variant', VARIANTS, ids=lambda v: '-'.join(map(str, v.values())))
def test_fast_routing_equals_reference(variant, layout):
  config = tiny_config(**variant)
  config.routing.layout = layout
  # A buffer as large as any group could need: nothing cut, so the plans must agree.
  config.routing.buffer_factor = 16.0
  x, mod, valid = routing_inputs()
  params = init_params(config, x, mod, valid)
  lists = ref.expert_lists(params, x, mod, valid, config)
  cot = jax.random.normal(jax.random.key(2), x.shape)

  y, plan, grads = jit_vjp(lambda p, x: fast(config, p, x, mod, valid)[:2], cot)(params, x)
  y_ref, _, grads_ref = jit_vjp(
      lambda p, x: (ref.routed_experts(p, x, config, lists), ()), cot)(params, x)
  assert ref.plan_lists(plan, x.shape[0], N) == lists
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('share', [0.0, 0.03, 0.3, 0.5, 0.9, 1.0])
def test_moma_takes_exactly_ceil_c_b_and_cuts_nothing(share):
  config = tiny_config(experts=(4, 4))
  n = 64
  rng = np.random.default_rng(int(share * 100))
  x = jnp.asarray(rng.normal(size=(3, n, D)), jnp.float32)
  mod = jnp.asarray((rng.random((3, n)) < share).astype(np.int8))
  valid = jnp.asarray(rng.random((3, n)) < 0.9)
  params = init_params(config, x, mod, valid)
  _, plan, stats = jax.jit(functools.partial(fast, config))(params, x, mod, valid)
  slots = routing_spec.from_config(config).slots
  for g in range(3):
    for m in range(2):
      b = int(((mod[g] == m) & valid[g]).sum())
      expect = -(-b // 4)
      np.testing.assert_array_equal(plan.wanted[g, list(slots[m])], expect)
  np.testing.assert_array_equal(plan.kept, plan.wanted)
  assert float(stats['dropped/text'][0]) == 0.0 and float(stats['dropped/image'][0]) == 0.0
  # Every row the plan holds is a real (token, expert) pair: R is never exceeded.
  assert int(plan.rows_per_expert.sum()) == int(plan.wanted.sum()) <= plan.token_index.shape[0]


def test_stacked_slots_interleave_groups_evenly():
  config = tiny_config(experts=(4, 2))
  slots = routing_spec.from_config(config).slots
  assert sorted(s for row in slots for s in row) == list(range(6))
  # Any expert-axis size dividing both groups (1, 2) gives each device E_i / X of each.
  for x in (1, 2):
    for device in range(x):
      mine = range(device * 6 // x, (device + 1) * 6 // x)
      assert [sum(s in mine for s in row) for row in slots] == [4 // x, 2 // x]
  assert routing_spec.from_config(tiny_config(experts=(2, 2))).slots == ((0, 2), (1, 3))


def test_one_modality_never_reaches_another_modalitys_experts():
  config = tiny_config(experts=(4, 4))
  x, mod, valid = routing_inputs(seed=3)
  params = init_params(config, x, mod, valid)
  is_image = (mod == 1) & valid

  def output_at(params, where):
    y, _, _ = fast(config, params, x, mod, valid)
    return jnp.sum(jnp.where(where[..., None], y, 0.0) ** 2)

  grad = jax.jit(jax.grad(output_at))
  g_image = grad(params, is_image)
  g_text = grad(params, (mod == 0) & valid)
  text, image = (list(s) for s in routing_spec.from_config(config).slots)
  for name in ('wi_0', 'wi_1', 'wo'):
    assert np.all(np.asarray(g_image[name])[text] == 0.0)
    assert np.all(np.asarray(g_text[name])[image] == 0.0)
    assert np.any(np.asarray(g_image[name])[image] != 0.0)
    assert np.any(np.asarray(g_text[name])[text] != 0.0)
  assert np.all(np.asarray(g_image['router_text']) == 0.0)
  assert np.all(np.asarray(g_text['router_image']) == 0.0)


def test_pack_closed_form():
  # One group, two experts: expert 0 wants 2 of [5, 1, 3], expert 1 wants 1 of [2, 0, 4].
  idx = jnp.array([[[5, 1, 3], [2, 0, 4]]], jnp.int32)
  gate = jnp.array([[[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]]])
  wanted = jnp.array([[2, 1]], jnp.int32)
  plan = routing.pack(routing.Selection(idx, gate, wanted), num_tokens=6, layout='ragged', rows=5)
  np.testing.assert_array_equal(plan.token_index, [5, 1, 2, 6, 6])
  np.testing.assert_allclose(plan.weight, [0.9, 0.8, 0.6, 0.0, 0.0])
  np.testing.assert_array_equal(plan.rows_per_expert, [2, 1])
  cap = routing.pack(routing.Selection(idx, gate, wanted), num_tokens=6, layout='capacity', capacity=1)
  np.testing.assert_array_equal(cap.token_index, [5, 2])          # expert 0 loses token 1
  np.testing.assert_array_equal(cap.kept, [[1, 1]])
  x = jnp.arange(12.0).reshape(6, 2)
  rows = plan.dispatch(x, kernels.XLA)
  np.testing.assert_array_equal(rows[3:], 0.0)                    # dump rows gather zeros
  y = plan.combine(rows, kernels.XLA)
  np.testing.assert_allclose(y[5], 0.9 * x[5])
  np.testing.assert_allclose(y[0], 0.0)


def test_ceil_capacity_is_exact_integer_arithmetic():
  c = routing_spec.as_fraction(1 / 3)
  assert c == fractions.Fraction(1, 3)
  b = jnp.array([0, 1, 3, 4, 30_000, 30_001])
  np.testing.assert_array_equal(routing_spec.ceil_frac(c, b), [0, 1, 1, 2, 10_000, 10_001])


def test_expert_parallel_receive_bound_is_the_ragged_rows():
  """4t4i at capacity 1/4: a device of an expert axis of X receives at most
  groups * (N + E) rows from the X * groups groups of its expert row, where the buffers
  hold X * E_x * groups * ceil(N / 4) = 2 * groups * N."""
  spec = routing_spec.from_config(tiny_config(experts=(4, 4)))
  n, groups, x = 64, 3, 4
  buffers = x * (8 // x) * groups * 16
  assert spec.ep_received_rows(n, groups, buffers) == groups * (n + 8) < buffers
  topk = routing_spec.from_config(tiny_config(ffn='topk', experts=(4,)))
  assert topk.ep_received_rows(n, groups, 100) == 100


def test_noise_scaled_to_logits_closed_form():
  """The factor gives logistic noise (std pi/sqrt(3)) each expert's logit std over the
  group's eligible tokens; a group with none gets 0."""
  logits = jnp.asarray([[[0.0, 1.0], [2.0, 1.0], [4.0, 7.0], [9.0, -3.0]],
                        [[1.0, 1.0], [5.0, 2.0], [3.0, 3.0], [0.0, 0.0]]])      # [2, 4, 2]
  eligible = jnp.asarray([[True, True, True, False], [False] * 4])
  got = routing.noise_scaled_to_logits(logits, eligible)
  assert got.shape == (2, 1, 2)
  want = np.std(np.asarray(logits[0, :3]), axis=0) / (np.pi / np.sqrt(3))
  np.testing.assert_allclose(got[0, 0], want, rtol=1e-6)
  np.testing.assert_array_equal(got[1, 0], [0.0, 0.0])
  # The scores add exactly the scaled logistic draw.
  key = jax.random.key(3)
  noise = jax.random.logistic(key, logits.shape, jnp.float32)
  np.testing.assert_allclose(routing.router_scores(logits, 'sigmoid', key, got),
                             jax.nn.sigmoid(logits + noise * got), rtol=1e-6)
  np.testing.assert_allclose(routing.router_scores(logits, 'sigmoid', key),
                             jax.nn.sigmoid(logits + noise), rtol=1e-6)


@pytest.mark.parametrize('noise,vanishes', [('gumbel_scaled', True), ('gumbel', False)])
def test_scaled_router_noise_vanishes_with_the_logits_spread(noise, vanishes):
  """Routers of zero weights give every token the same logit: noise scaled to the
  logits' spread is then 0 and training routes as evaluation does, while the paper's
  unscaled noise still reorders the tokens."""
  config = tiny_config(experts=(4, 4), router_noise=noise)
  x, mod, valid = routing_inputs()
  params = init_params(config, x, mod, valid)
  params = {k: (jnp.zeros_like(v) if k.startswith('router_') else v)
            for k, v in params.items()}
  module = RoutedExperts(ml_collections.FrozenConfigDict(config.model),
                         routing_spec.from_config(config))
  run = jax.jit(lambda deterministic: module.apply(
      {'params': params}, x, mod, valid, deterministic, mutable=['intermediates'],
      rngs={'router': jax.random.key(5)})[1]['intermediates']['plan'][0].token_index,
      static_argnums=0)
  assert np.array_equal(run(True), run(False)) == vanishes
