"""The analytic FLOPs count (moma_jax/analysis/flops.py) against XLA's compiled count and the paper.

XLA's `cost_analysis()['flops']` of the jitted forward pass differs from our convention
in known ways, each accounted for explicitly here:
  * attention: XLA computes the full masked L x L square, we count the causal half, so
    XLA does our `attention_context` twice;
  * routers: XLA scores every token with every group's router, we count only the
    routers of the groups serving the token's modality;
  * elementwise work (norms, RoPE, softmax, SiLU, gathers): XLA counts it, we do not.
    That is what the tolerance is for, so the output head is kept from dominating
    (vocabulary 4 * d_model, about a seventh of the count) and the ratio must also be >= 1.
On CPU `jax.lax.ragged_dot` is counted as E full matmuls (each expert over all rows),
so the sparse models use `routing.layout='capacity'` at capacity factor 1.0: one batched
einsum over exactly N rows in all, which cost_analysis counts exactly.

Axis legend: B batch, L length, D embed, V vocabulary, E experts.
"""
import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import pytest

from moma_jax.analysis import flops
from moma_jax.cli import flops as flops_cli
from moma_jax import configs
from moma_jax.model import routing_spec
from moma_jax.model import transformer

ROOT = os.path.join(os.path.dirname(__file__), '..')
TABLE1 = os.path.join(ROOT, 'experiments', 'paper_table1.py')


def small_config(ffn='dense', d=128, heads=2, layers=2, seq=32, experts=(4, 4), **mod):
  """d_model d, ffn 4d, vocabulary 4d; sparse FFNs in the exact capacity layout."""
  c = configs.default_config()
  m = c.model
  m.d_model, m.num_heads, m.num_layers = d, heads, layers
  m.ffn_dim, m.vocab_size, m.max_len = 4 * d, 4 * d, seq
  m.ffn, m.experts = ffn, tuple(experts)
  if mod:
    m.mod.enabled = True
    m.mod.update(mod)
  c.data.seq_len = seq
  c.routing.group_size = 2
  c.routing.layout = 'capacity'
  c.routing.buffer_factor = 1.0
  return configs.validate(c)


@functools.lru_cache(maxsize=None)
def compiled_flops(ffn, d, heads, experts=(4, 4), mod=False, batch=2):
  """XLA's forward FLOPs per token of `small_config(ffn, d, heads)`, from shapes only.

  mod: layer 0 is a MoD layer, with routing groups of one sequence. (A MoD layer runs
  attention over the picked tokens of its whole routing group, P = c_d * S * L slots,
  as one masked square: XLA's count grows with the group size S; at S = 1 it is the
  full square of what we count as half, as for dense layers.)
  """
  config = small_config(ffn, d, heads, experts=experts, **(dict(capacity=0.25) if mod else {}))
  if mod:
    config.routing.group_size = 1
  model = transformer.build(config)
  params = jax.eval_shape(lambda: transformer.init(model, jax.random.key(0))[0])
  shape = lambda dtype: jax.ShapeDtypeStruct((batch, config.data.seq_len), dtype)
  fwd = lambda p, tok, mod, seg, pos: model.apply({'params': p}, tok, mod, seg, pos)
  cost = jax.jit(fwd).lower(params, shape(jnp.int32), shape(jnp.int8), shape(jnp.int32),
                            shape(jnp.int32)).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):       # older JAX: one dict per computation
    cost = cost[0]
  return config, cost['flops'] / (batch * config.data.seq_len)


def xla_router_flops(config):
  """Router FLOPs per token as XLA does them: every group's router on every token (that
  runs the block, in MoD layers), plus the MoD routers."""
  m = config.model
  width = routing_spec.from_config(config).num_experts
  c_d = m.mod.capacity
  return sum((c_d if is_mod else 1.0) * 2.0 * m.d_model * width + (
      2.0 * m.d_model if is_mod else 0.0) for is_mod in configs.mod_layers(m))


def xla_equivalent(config):
  """Our forward count, plus the masked half of attention and the other groups' routers."""
  report = flops.count(config)
  b = report.forward_breakdown['overall']
  return report.forward['overall'] + b['attention_context'] - b['routers'] + (
      xla_router_flops(config))


# ----------------------------------------------------------------------------------
# (a) analytic forward count vs XLA's compiled count
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize('ffn,d,heads,experts,mod', [
    ('dense', 64, 2, (4, 4), False), ('dense', 128, 2, (4, 4), False),
    ('dense', 256, 4, (4, 4), False), ('moma', 128, 2, (4, 4), False),
    ('moe', 128, 2, (8,), False), ('moma', 128, 2, (4, 4), True)])
def test_forward_matches_compiled_cost(ffn, d, heads, experts, mod):
  config, compiled = compiled_flops(ffn, d, heads, experts, mod)
  ratio = compiled / xla_equivalent(config)
  print(f'{ffn} d={d} mod={mod}: compiled / analytic = {ratio:.4f}')
  # >= 1: we never count work XLA does not do; <= 1.05: the elementwise rest is small.
  assert 1.0 <= ratio <= 1.05, ratio


# ----------------------------------------------------------------------------------
# (b) MoMa 4t4i at the default capacity costs what the dense model costs
# ----------------------------------------------------------------------------------
def test_moma_costs_dense_flops():
  moma, moma_flops = compiled_flops('moma', 128, 2, (4, 4))
  _, dense_flops = compiled_flops('dense', 128, 2, (4, 4))
  # The routers are the only matmuls MoMa adds (0.4% here); the rest of the gap is
  # routing's elementwise work (top-k, gathers, gate multiply, scatter-add).
  ratio = (moma_flops - xla_router_flops(moma)) / dense_flops
  print(f'moma 4t4i / dense, routers aside: {ratio:.4f}')
  assert abs(ratio - 1) <= 0.02, ratio
  # The analytic count agrees: same FFN FLOPs, only the routers differ.
  report, dense_report = flops.count(moma), flops.count(small_config('dense'))
  assert report.forward['overall'] - report.forward_breakdown['overall']['routers'] == (
      dense_report.forward['overall'])


# ----------------------------------------------------------------------------------
# (c) moma-flops reproduces the paper's Table 1 parameter counts
# ----------------------------------------------------------------------------------
TABLE1_TOTALS = {  # millions of parameters: 90m, 435m, 1.4b
    'dense': (92.3, 436.2, 1476.4),
    'moe_8x': (209.7, 1845.5, 7113.5),
    'mod_dense': (111.1, 637.5, 2340.4),
    'mod_moe_8x': (316.7, 2986.3, 11853.1),
}


def moma_flops_json(capsys, variant):
  """Runs the moma-flops entry point in this process and returns its JSON."""
  flops_cli.run(['moma-flops', '--config', f'{TABLE1}:{variant}', '--json'])
  return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize('kind', sorted(TABLE1_TOTALS))
def test_paper_table1_totals(capsys, kind):
  for size, expected in zip(('90m', '435m', '1.4b'), TABLE1_TOTALS[kind]):
    got = moma_flops_json(capsys, f'{kind}_{size}')['model']['params_total'] / 1e6
    assert got == pytest.approx(expected, rel=0.01), (kind, size, got)


def test_paper_table1_sparse_models_cost_their_dense_model(capsys):
  out = moma_flops_json(capsys, 'moma_4t4i_435m')
  moe = moma_flops_json(capsys, 'moe_8x_435m')
  # Two 4-way routers have the parameters of one 8-way router.
  assert out['model']['params_total'] == moe['model']['params_total']
  assert out['dense']['num_layers'] == 24
  assert out['forward_ratio'] == pytest.approx(1.0, abs=1e-3)


def test_paper_mod_depths_match_dense():
  """The paper's MoD depths (14 and 40 layers) are the FLOPs-matched ones."""
  spec = importlib.util.spec_from_file_location('paper_table1', TABLE1)
  table1 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(table1)
  assert flops.mod_layers_matching(table1.get_config('dense_90m')) == 14
  assert flops.mod_layers_matching(table1.get_config('dense_435m')) == 40
  matched = flops.compute_matched_dense(table1.get_config('mod_dense_435m'))
  assert matched.model.num_layers == 24


# ----------------------------------------------------------------------------------
# (d) exact values on a small config
# ----------------------------------------------------------------------------------
def exact_config(ffn='dense', layers=2, experts=(4, 4), **mod):
  """D 64, F 64 (ffn_dim 96), V 128, L 16, 2 heads (K 32)."""
  c = small_config(ffn, d=64, heads=2, layers=layers, seq=16, experts=experts, **mod)
  c.model.ffn_dim, c.model.vocab_size = 96, 128
  return configs.validate(c)


def test_exact_counts():
  # Per layer: projections 8*64*64 = 32768, context 2*16*64 = 2048 (8 keys on average,
  # QK^T and AV), SwiGLU 6*64*64 = 24576; head 2*64*128 = 16384.
  dense = flops.count(exact_config())
  assert dense.forward['text'] == 2 * (32768 + 2048 + 24576) + 16384 == 135168
  assert dense.train['overall'] == 3 * 135168
  # embed + output 2*8192, attention 2*16384, FFN 2*12288, norms 2*(2*32 + 2*64) + 64.
  assert dense.params_total == 16384 + 32768 + 24576 + 448 == 74176
  assert dense.params_active['image'] == dense.params_total

  moma = flops.count(exact_config('moma'))
  assert moma.forward['image'] == 135168 + 2 * (2 * 64 * 4)     # plus its 4-way router
  assert moma.params_total == 74176 - 24576 + 8 * 24576 + 2 * 64 * 8
  assert moma.params_active['text'] == 74176 + 2 * 64 * 4

  # Layer 0 is MoD (c_d 1/4): 1/4 of projections and SwiGLU, 1/4 of tokens over 2 keys
  # on average, plus the 2*64 router; layer 1 is dense.
  mod = flops.count(exact_config(capacity=0.25))
  mod_layer = (32768 + 24576) / 4 + 2 * 2 * 2 * 64 / 4 + 128
  assert mod_layer == 14592
  assert mod.forward['overall'] == 14592 + 59392 + 16384 == 90368
  assert mod.num_mod_layers == 1


def test_active_parameters_are_half_the_matmul_flops():
  report = flops.count(exact_config('moma', layers=3, capacity=0.25))
  b, p = report.forward_breakdown['text'], report.params_breakdown
  assert report.forward['text'] - b['attention_context'] == pytest.approx(
      2 * (report.params_active['text'] - p['embedding'] - p['norms']))


@pytest.mark.parametrize('ffn,mod', [('dense', {}), ('moma', {}), ('topk', {}),
                                     ('moma', dict(capacity=0.25))])
def test_params_total_is_the_model_parameter_count(ffn, mod):
  config = exact_config(ffn, experts=(8,) if ffn == 'topk' else (4, 4), **mod)
  model = transformer.build(config)
  shapes = jax.eval_shape(lambda: transformer.init(model, jax.random.key(0))[0])
  n = sum(x.size for x in jax.tree.leaves(shapes))
  assert flops.count(config).params_total == n


def test_compute_matched_dense_and_mod_layers():
  mod = exact_config(capacity=0.25)
  dense = flops.compute_matched_dense(mod)
  # Candidates: 1 layer 75776 FLOPs, 2 layers 135168; the MoD model costs 90368.
  assert dense.model.num_layers == 1
  assert dense.model.ffn == 'dense' and not dense.model.mod.enabled
  assert dense.model.d_model == 64 and dense.data.seq_len == 16
  configs.validate(dense)
  assert mod.model.num_layers == 2 and mod.model.mod.enabled   # the input is untouched
  # Non-MoD sparse models with E * c = 1 get their own depth.
  assert flops.compute_matched_dense(exact_config('moma', layers=2)).model.num_layers == 2
  # MoD depths 3 and 4 cost 104960 and 164352; the dense 2-layer model 135168.
  assert flops.mod_layers_matching(exact_config(layers=2)) == 4
  # One dense layer, 75776: MoD depth 1 costs 30976, depth 2 costs 90368.
  assert flops.mod_layers_matching(exact_config(layers=1)) == 2


def test_measured_routing_counts_the_experts_and_picks_it_was_given():
  # moma 4t4i, 2 layers: at the spec's own usage (one expert's worth per token) the count
  # is `count`'s plus the auxiliary routers: D^2 + D * 4 = 4352 per layer.
  moma = exact_config('moma')
  spec_usage = flops.Usage(experts={'text': (1.0, 1.0), 'image': (1.0, 1.0)},
                           picked={'all': (1.0, 1.0), 'text': (1.0, 1.0),
                                   'image': (1.0, 1.0)})
  got = flops.measured_forward(moma, spec_usage)
  assert got['aux_routers/text'] == 2 * 4352
  assert got['text'] == flops.count(moma).forward['text'] + 2 * 4352
  # Two experts per image token in layer 0: one more SwiGLU, 6*64*64.
  more = flops.Usage(experts={'text': (1.0, 1.0), 'image': (2.0, 1.0)},
                     picked=spec_usage.picked)
  assert flops.measured_forward(moma, more)['image'] == got['image'] + 24576
  # MoD layer 0 (dense FFN, no expert routers): picked 1/2 of the text tokens, 1/4 of
  # all: 1/2 of projections and SwiGLU, context over 1/4 of the keys, + the MoD aux
  # router D^2 + D on every token; None experts fall back to the dense FFN's one.
  mod = exact_config(capacity=0.25)
  usage = flops.Usage(experts={'text': (None, None), 'image': (None, None)},
                      picked={'all': (0.25, 1.0), 'text': (0.5, 1.0), 'image': (0.0, 1.0)})
  layer0 = (32768 + 24576) / 2 + 2 * 2 * (0.25 * 8) * 64 / 2 + 128 + (4096 + 64)
  assert flops.measured_forward(mod, usage)['text'] == layer0 + 59392 + 16384
