"""experiments/repro_small.py: compute-matched variants whose buffers never cut a row,
on data that is never repeated; data.options builds the larger dataset."""
import importlib.util
import json
import os

import pytest

from moma_jax.analysis import flops
from moma_jax.analysis import savings
from moma_jax import configs
from moma_jax.data import pipeline
from moma_jax.model import routing_spec

_PATH = os.path.join(os.path.dirname(__file__), '..', 'experiments', 'repro_small.py')


def _module():
  spec = importlib.util.spec_from_file_location('repro_small', _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('variant', [
    '1t1i', '4t4i', 'moe_8x', 'mod_1t1i', 'mod_4t4i', 'mod_4t4i_aware', 'up_4t4i',
    'up_4t4i_carry', 'up_4t4i_nonoise', 'up_4t4i_scaled', 'up_4t4i_at100,seed=1',
    'up_4t4i_at100_nonoise'])
def test_variants_are_compute_matched_and_exact(variant):
  repro = _module()
  dense = flops.count(repro.get_config('dense')).train['overall']
  c = repro.get_config(variant)
  if variant.startswith('up_'):     # the source run is named on the command line
    with pytest.raises(configs.ConfigError, match='upcycle'):
      configs.validate(c)
    c.upcycle.from_workdir = 'runs/repro_small/1t1i'
    # The same total steps as the source, whose data stream it continues.
    assert c.upcycle.at_step + c.train.steps == repro.STEPS
    assert c.data.seed == 0 and c.train.seed == (1 if 'seed=1' in variant else 0)
  c = configs.validate(c)
  assert flops.count(c).train['overall'] == pytest.approx(dense, rel=0.03)
  # The capacity buffer holds the most rows expert choice can ask of one expert in a
  # routing group, whatever its modality mix: ceil(c * N) (all N tokens of one group).
  spec = routing_spec.from_config(c)
  n = c.routing.group_size * c.data.seq_len
  if c.model.mod.enabled:       # inside a MoD block, the picked tokens form the group
    n = spec.picked_slots(n)
  worst = max(routing_spec.ceil_frac(g.capacity, n) for g in spec.groups)
  assert spec.buffer_capacity(n) >= worst


def test_seed_and_bad_arguments():
  repro = _module()
  c = repro.get_config('4t4i,seed=1')
  assert c.train.seed == c.data.seed == 1
  for bad in ('4t4i,seed=x', 'dense,lr=1', 'moe_4x'):
    with pytest.raises(ValueError):
      repro.get_config(bad)


def test_dataset_options_parse_and_reject():
  c = configs.default_config()
  c.data.options = 'moma_shapes:num_train=100:num_validation=20; moma_digits:num_train=5'
  assert configs.dataset_options(c.data) == {
      'moma_shapes': {'num_train': 100, 'num_validation': 20},
      'moma_digits': {'num_train': 5}}
  for bad in ('moma_shapes:num_train', 'moma_shapes:num_train=x', ':num_train=1',
              'moma_shapes:num_train=1;moma_shapes:num_train=2'):
    c.data.options = bad
    with pytest.raises(configs.ConfigError, match='data.options'):
      configs.dataset_options(c.data)


def test_dataset_options_reach_the_pipeline(data_setup):
  config, tok = data_setup
  c = configs.default_config()
  c.update_from_flattened_dict({'data.data_dir': config.data.data_dir,
                                'data.vq.fit_images': config.data.vq.fit_images})
  c.data.options = 'moma_shapes:num_train=50:num_validation=10'
  assert len(pipeline.DatasetDocuments(c, 'moma_shapes', 'train', tok).source) == 50
  assert len(pipeline.DatasetDocuments(c, 'moma_shapes', 'validation', tok).source) == 10


def _report():
  spec = importlib.util.spec_from_file_location(
      'repro_small_report', os.path.join(os.path.dirname(_PATH), 'repro_small_report.py'))
  report = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(report)
  return report


def test_report_counts_an_upcycled_run_s_steps_from_its_source_s(tmp_path):
  """The upcycled variant's own step s is the study's step s + upcycle.at_step, so its
  mid-training cell (the study's step 300) is empty and its end cell is its last row."""
  report = _report()
  repro = _module()
  for name in ('up_4t4i', '4t4i'):
    os.makedirs(tmp_path / name)
    (tmp_path / name / 'config.json').write_text(repro.get_config(name).to_json())
  offsets = {n: report.step_offset(str(tmp_path), n) for n in ('up_4t4i', '4t4i')}
  assert offsets == {'up_4t4i': repro.UPCYCLE_STEP, '4t4i': 0}
  rows = [savings.Row(name, m, 'eval', step, 1e9 * step, 1.0, eta, False)
          for name, base in (('up_4t4i', 1.0), ('4t4i', 2.0)) for m in report.MODS
          for step, eta in ((100, base + 0.1), (300, base + 0.3), (600, base + 0.6))
          if name == '4t4i' or step <= 300]
  table = report.eta_table(rows, ('up_4t4i', '4t4i'), 'eval', 300, 600, offsets)
  assert table[2] == ('| up_4t4i | - / - / - | 1.30 / 1.30 / 1.30 | 1.30 (s600) / 1.30 '
                      '(s600) / 1.30 (s600) | - / - / - |')
  assert table[3] == ('| 4t4i | 2.30 / 2.30 / 2.30 | 2.60 / 2.60 / 2.60 | 2.60 (s600) / '
                      '2.60 (s600) / 2.60 (s600) | 2.6 / 5.2 / 3.7 |')


def test_report_bias_table_is_each_run_s_split_minus_mixed_beyond_dense_s(tmp_path):
  """A dataset's loss with its split routed alone, on the mixed batches, their difference,
  and for a routed run that difference less dense's (dense routes nothing)."""
  report = _report()
  keys = [key for _, key in report.BIAS_KEYS]
  split = {'dense': (2.0, 0.5, 1.0), '4t4i': (1.8, 0.4, 0.9)}
  mixed = {'dense': (1.9, 0.5, 1.0), '4t4i': (1.6, 0.45, 0.9)}
  metrics = {}
  for name in split:
    os.makedirs(tmp_path / name)
    (tmp_path / name / 'eval_split.json').write_text(json.dumps(
        {f'eval_split/{k}': v for k, v in zip(keys, split[name])}))
    metrics[name] = [{'step': 600, **{f'eval/{k}': v for k, v in zip(keys, mixed[name])}}]
  lines = report.bias_section(str(tmp_path), metrics)
  assert lines[-3] == '| dense | 2.000 / 1.900 (+0.100) | 0.500 / 0.500 (+0.000) | ' \
                      '1.000 / 1.000 (+0.000) |'
  assert lines[-2] == '| 4t4i | 1.800 / 1.600 (+0.200, +0.100) | 0.400 / 0.450 ' \
                      '(-0.050, -0.050) | 0.900 / 0.900 (+0.000, +0.000) |'
