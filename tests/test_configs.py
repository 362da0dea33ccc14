"""The config schema: one module per block, holding its defaults and its validator.

The scan below reads the source with `ast`: a field's own rules (what the config alone
decides) are written in moma_jax/configs/, and other modules raise ConfigError only
against what a config cannot know by itself, each listed with that reason.
"""
import ast
import importlib
import os

import ml_collections
import pytest

from moma_jax import configs

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
BLOCKS = ('model', 'routing', 'data', 'train', 'mesh', 'upcycle')
# Modules outside configs/ that may raise ConfigError, and what they check it against.
_CHECKS_AGAINST = {
    'moma_jax/model/sharding.py': 'the devices there are, and the experts per group',
    'moma_jax/training/upcycle.py': 'the source run on disk',
    'moma_jax/data/pipeline.py': 'the tokenizers built and the processes running',
    'moma_jax/analysis/flops.py': 'a search over depths of the MoD variant',
}


def test_every_block_has_one_module_with_its_defaults_and_validator():
  config = configs.default_config()
  blocks = [k for k, v in config.items() if isinstance(v, ml_collections.ConfigDict)]
  assert sorted(blocks) == sorted(BLOCKS)
  for name in blocks:
    module = importlib.import_module(f'moma_jax.configs.{name}')
    assert module.defaults().to_dict() == config[name].to_dict(), name
    assert callable(module.validate), name


def _config_error_raisers():
  """{path: first line of a `ConfigError(...)` call} for modules outside configs/."""
  found = {}
  for folder, dirs, files in os.walk(os.path.join(ROOT, 'moma_jax')):
    dirs[:] = [d for d in dirs if d != '__pycache__']
    for name in files:
      path = os.path.relpath(os.path.join(folder, name), ROOT).replace(os.sep, '/')
      if not name.endswith('.py') or path.startswith('moma_jax/configs/'):
        continue
      with open(os.path.join(ROOT, path), encoding='utf-8') as f:
        tree = ast.parse(f.read())
      for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
            and (getattr(node.func, 'attr', None) or getattr(node.func, 'id', None))
            == 'ConfigError'):
          found.setdefault(path, node.lineno)
  return found


def test_field_rules_live_beside_their_defaults():
  stray = {p: line for p, line in _config_error_raisers().items() if p not in _CHECKS_AGAINST}
  assert not stray, ('a config field is checked outside moma_jax/configs/ (put the rule in '
                     'its block\'s module, or list what it checks against): ' +
                     ', '.join(f'{p}:{line}' for p, line in sorted(stray.items())))


def test_the_scan_sees_the_old_train_checks(tmp_path, monkeypatch):
  """The rule fails on a module like the old training/checks.py."""
  old = tmp_path / 'moma_jax' / 'training'
  old.mkdir(parents=True)
  (old / 'checks.py').write_text(
      'def check_train_config(config):\n'
      '  if not config.train.lr > 0:\n'
      "    raise configs.ConfigError('train.lr', 'must be > 0')\n")
  monkeypatch.setattr(__import__(__name__), 'ROOT', str(tmp_path))
  assert _config_error_raisers() == {'moma_jax/training/checks.py': 3}


def _config(**fields):
  c = configs.default_config()
  for dotted, value in fields.items():
    *parents, leaf = dotted.split('__')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.mark.parametrize('fields, message', [
    # train.* (the trainer checked these on its own before)
    (dict(train__lr=0.0), 'train.lr: must be > 0, got 0.0'),
    (dict(train__schedule='step'), "train.schedule: must be 'linear' or 'cosine'"),
    (dict(train__warmup=-1), 'train.warmup: must be an integer >= 0, got -1'),
    (dict(train__keep=0), 'train.keep: must be a positive integer, got 0'),
    (dict(train__prefetch=-2), 'train.prefetch: must be an integer >= 0, got -2'),
    (dict(train__eval_max_batches=0), 'train.eval_max_batches: must be a positive integer'),
    (dict(train__grad_accum=2), 'train.grad_accum: batch 8 / 2 micro-batches must be a '
                                'multiple of routing.group_size=8'),
    # data.* (the pipeline found these only when it opened the data)
    (dict(data__mixture='moma_shapes:-1'), 'data.mixture: expected "name:weight,..."'),
    (dict(data__options='moma_shapes:num_train=x'), 'data.options: expected'),
    (dict(data__formats=(1.0, 1.0)), 'data.formats: needs 3 proportions'),
    (dict(data__formats=(0, 0, 0)), 'data.formats: needs 3 proportions'),
    (dict(data__images_per_interleaved=0), 'data.images_per_interleaved: must be a positive'),
    # mesh.* (checked when the mesh was made, after the config was accepted)
    (dict(mesh__fsdp=0), 'mesh.fsdp: must be a positive integer or -1, got 0'),
    (dict(mesh__tensor=-1), 'mesh: at most one axis may be -1, got data, tensor'),
])
def test_each_block_validator_names_the_field(fields, message):
  with pytest.raises(configs.ConfigError) as info:
    configs.validate(_config(**fields))
  assert str(info.value).startswith(message), str(info.value)


def test_defaults_are_valid_and_values_at_the_edges_pass():
  configs.validate(configs.default_config())
  configs.validate(_config(train__warmup=0, train__prefetch=0, data__formats=(0, 0, 1),
                           mesh__data=1, mesh__expert=-1))
