"""moma_jax/variants.py: the one grammar of variant names, and the experiment files on it.

The experiment-file cases state the model fields each name gave before the files shared
the parser, written out by hand, so a change in what a name means fails here.
"""
import importlib.util
import os

import pytest

from moma_jax.analysis import flops
from moma_jax import configs
from moma_jax import variants

EXPERIMENTS = os.path.join(os.path.dirname(__file__), '..', 'experiments')
DEFAULT_EXPERTS = (4, 4)          # configs.default_config(): what a dense variant keeps


def _experiment(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _model_fields(config):
  m = config.model
  return m.ffn, tuple(m.experts), bool(m.mod.enabled)


@pytest.mark.parametrize('name, mod, ffn, experts', [
    ('dense', False, 'dense', ()),
    ('mod_dense', True, 'dense', ()),
    ('moe_8x', False, 'moe', (8,)),
    ('moe_16x', False, 'moe', (16,)),
    ('mod_moe_8x', True, 'moe', (8,)),
    ('moma_4t4i', False, 'moma', (4, 4)),
    ('moma_2t6i', False, 'moma', (2, 6)),
    ('moma_12t1i', False, 'moma', (12, 1)),
    ('mod_moma_1t1i', True, 'moma', (1, 1)),
    ('4t4i', False, 'moma', (4, 4)),
    ('1t3i', False, 'moma', (1, 3)),
    ('mod_1t1i', True, 'moma', (1, 1)),
])
def test_parse_each_form(name, mod, ffn, experts):
  assert variants.parse(name) == variants.Variant(mod=mod, ffn=ffn, experts=experts)


@pytest.mark.parametrize('name, canonical', [
    ('dense', 'dense'), ('mod_moe_8x', 'mod_moe_8x'), ('4t4i', 'moma_4t4i'),
    ('mod_1t1i', 'mod_moma_1t1i'), ('moma_2t6i', 'moma_2t6i')])
def test_canonical_name(name, canonical):
  assert variants.parse(name).name == canonical


@pytest.mark.parametrize('name', [
    '', 'Dense', 'dense_', 'moe', 'moe_x', 'moe_8', 'moe8x', 'moma', 'moma_4t4', 'moma_4i4t',
    'moma_4t4i_', 'mod_', 'mod_mod_dense', 'mode_dense', ' dense', '4t', 't4i', 'moe_8x,seed=1',
    'dense_90m', None, 4])
def test_rejects_names_outside_the_grammar(name):
  with pytest.raises(ValueError, match=r'expected \[mod_\]\{dense\|moe_<E>x\|moma_<n>t<m>i\|'
                                       r'<n>t<m>i\}'):
    variants.parse(name)


@pytest.mark.parametrize('name', ['moe_0x', 'moma_0t4i', '4t0i', 'mod_0t0i'])
def test_rejects_zero_experts(name):
  with pytest.raises(ValueError, match='expert counts must be at least 1'):
    variants.parse(name)


def test_apply_sets_the_three_fields_and_keeps_dense_experts():
  m = configs.default_config().model
  m.experts, m.mod.enabled = (2, 3), False
  variants.apply(variants.parse('mod_moe_8x'), m)
  assert (m.ffn, tuple(m.experts), m.mod.enabled) == ('moe', (8,), True)
  variants.apply(variants.parse('dense'), m)
  assert (m.ffn, tuple(m.experts), m.mod.enabled) == ('dense', (8,), False)


def test_apply_moma_needs_text_and_image():
  m = configs.default_config().model
  m.modalities = ('text', 'image', 'audio')
  with pytest.raises(ValueError, match=r"moma_4t4i needs modalities \(text, image\), got "
                                       r"\('text', 'image', 'audio'\)"):
    variants.apply(variants.parse('4t4i'), m)
  variants.apply(variants.parse('moe_8x'), m)     # one group over all modalities: fine
  assert m.ffn == 'moe'


# ----------------------------------------------------------------------------------
# The experiment files: each name's model fields as they were.

@pytest.mark.parametrize('arg, fields', [
    (None, ('moma', (4, 4), False)),
    ('dense', ('dense', (4, 4), False)),
    ('moma_4t4i', ('moma', (4, 4), False)),
    ('moe_8x', ('moe', (8,), False)),
    ('mod_moma_4t4i', ('moma', (4, 4), True)),
])
def test_quickstart_variants(arg, fields):
  qs = _experiment('quickstart')
  c = qs.get_config(arg)
  assert _model_fields(c) == fields
  assert c.model.num_layers == 4
  configs.validate(c)


def test_quickstart_names_are_its_list():
  qs = _experiment('quickstart')
  assert qs.VARIANTS == ('dense', 'moma_4t4i', 'moe_8x', 'mod_moma_4t4i')
  for bad in ('4t4i', 'moma_1t1i', 'moe_4x', 'mod_dense', 'nope'):
    with pytest.raises(ValueError, match=f"unknown quickstart variant '{bad}'; one of dense, "
                                         'moma_4t4i, moe_8x, mod_moma_4t4i'):
      qs.get_config(bad)


@pytest.mark.parametrize('arg, fields, mod_depth', [
    (None, ('moma', (4, 4), False), False),
    ('dense', ('dense', DEFAULT_EXPERTS, False), False),
    ('1t1i', ('moma', (1, 1), False), False),
    ('4t4i', ('moma', (4, 4), False), False),
    ('moe_8x', ('moe', (8,), False), False),
    ('mod_1t1i', ('moma', (1, 1), True), True),
    ('mod_4t4i', ('moma', (4, 4), True), True),
    ('4t4i,seed=2', ('moma', (4, 4), False), False),
    ('mod_1t1i,seed=1', ('moma', (1, 1), True), True),
])
def test_repro_small_variants(arg, fields, mod_depth):
  repro = _experiment('repro_small')
  c = repro.get_config(arg)
  assert _model_fields(c) == fields
  # The MoD models are as deep as matches the dense model's FLOPs per token.
  dense = repro.get_config('dense')
  assert c.model.num_layers == (flops.mod_layers_matching(dense) if mod_depth else 4)
  assert c.routing.buffer_factor == (1.0 if fields[0] == 'moe' else 2.0)
  seed = int(arg.partition('seed=')[2] or 0) if arg else 0
  assert c.train.seed == c.data.seed == seed


def test_repro_small_names_are_its_list():
  repro = _experiment('repro_small')
  for bad in ('moma_4t4i', 'moe_4x', 'mod_dense', '2t2i'):
    with pytest.raises(ValueError, match=f"unknown repro_small variant '{bad}'; one of dense, "
                                         '1t1i, 4t4i, moe_8x, mod_1t1i, mod_4t4i'):
      repro.get_config(bad)
  for bad in ('4t4i,seed=x', 'dense,lr=1', '4t4i,seed='):
    with pytest.raises(ValueError, match=r'expected VARIANT\[,seed=S\]'):
      repro.get_config(bad)


# name -> (ffn, experts, mod.enabled); with each size's (layers, d_model) of Table 1.
TABLE1 = {
    'dense': ('dense', DEFAULT_EXPERTS, False),
    'moe_8x': ('moe', (8,), False),
    'moma_4t4i': ('moma', (4, 4), False),
    'moma_1t1i': ('moma', (1, 1), False),
    'moma_2t6i': ('moma', (2, 6), False),
    'mod_dense': ('dense', DEFAULT_EXPERTS, True),
    'mod_moe_8x': ('moe', (8,), True),
    'mod_moma_4t4i': ('moma', (4, 4), True),
    'mod_moma_1t1i': ('moma', (1, 1), True),
}
TABLE1_SIZES = {'90m': ((8, 512), (14, 512)), '435m': ((24, 1024), (40, 1024)),
                '1.4b': ((24, 2048), (32, 2304))}


@pytest.mark.parametrize('size', TABLE1_SIZES)
@pytest.mark.parametrize('name', TABLE1)
def test_paper_table1_variants(name, size):
  c = _experiment('paper_table1').get_config(f'{name}_{size}')
  fields = TABLE1[name]
  assert _model_fields(c) == fields
  assert (c.model.num_layers, c.model.d_model) == TABLE1_SIZES[size][fields[2]]


@pytest.mark.parametrize('arg', [
    None, '', 'dense', 'moma_4t4i', 'moma_4t4i_2b', 'moma_9x_90m', 'moe_4x_90m',
    'moe_16x_435m', '4t4i_90m', 'mod_1t1i_90m', 'mod_mod_dense_90m', 'moma_0t4i_90m',
    'dense_90m_90m'])
def test_paper_table1_rejects(arg):
  with pytest.raises(ValueError, match=r'of paper_table1.py; valid: \[mod_\]\{dense\|moe_8x\|'
                                       r'moma_<n>t<m>i\}_\{90m\|435m\|1.4b\}'):
    _experiment('paper_table1').get_config(arg)
