"""Bad data: one line on stderr, exit code 2, and no workdir made or changed.

Each case damages a private copy of the test data directory (or builds a small TFDS
dataset that is wrong in one way) and runs `moma-train` on it. The data is checked
before the workdir is created (moma_jax/data/checks.py); a record that is found bad only
mid-run stops the run the same way, with its checkpoints intact, and a rerun on repaired
data resumes.
"""
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import tiny_train_config, train_usage_error
from moma_jax.cli import train as train_cli
from moma_jax.data import datasets
from moma_jax.data import pipeline
from moma_jax.runs import checkpoint as ckpt_lib
from moma_jax.training import trainer as train

QUICKSTART = 'experiments/quickstart.py'


class _Tiny(tfds.core.GeneratorBasedBuilder):
  """A small dataset made of FEATURES and the TRAIN / VALIDATION examples."""
  VERSION = tfds.core.Version('1.0.0')
  code_path = None
  FEATURES: dict = {}
  TRAIN: list = []
  VALIDATION: list = []

  def _info(self):
    return tfds.core.DatasetInfo(builder=self,
                                 features=tfds.features.FeaturesDict(self.FEATURES))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(self.TRAIN),
            'validation': self._generate_examples(self.VALIDATION)}

  def _generate_examples(self, examples):
    yield from enumerate(examples)


def _text(n):
  return [{'text': f'a sentence, number {i}.'} for i in range(n)]


class BadTokenIds(_Tiny):
  FEATURES = {'tokens': tfds.features.Tensor(shape=(None,), dtype=np.int32)}
  TRAIN = [{'tokens': np.array([1, 50, 10**6, 2], np.int32)}] * 20
  VALIDATION = TRAIN[:4]


class WrongImageShape(_Tiny):
  FEATURES = {'caption': tfds.features.Text(),
              'image': tfds.features.Tensor(shape=(16, 16, 3), dtype=np.uint8)}
  TRAIN = [{'caption': 'grey', 'image': np.full((16, 16, 3), 128, np.uint8)}] * 20
  VALIDATION = TRAIN[:4]


class OtherFeatures(_Tiny):
  FEATURES = {'label': tfds.features.Scalar(dtype=np.int64)}
  TRAIN = [{'label': i} for i in range(20)]
  VALIDATION = TRAIN[:4]


def _shard(data_dir, name, split='train'):
  builder = datasets.prepare(name, data_dir)
  return os.fspath(builder.info.splits[split].filepaths[0]), builder.data_dir


def _truncate(data_dir):
  path, _ = _shard(data_dir, 'moma_pydoc')
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  return 'moma_pydoc: shard', 'is corrupt'


def _flip_bits(data_dir):
  path, _ = _shard(data_dir, 'moma_shapes')
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 3)
    chunk = f.read(64)
    f.seek(os.path.getsize(path) // 3)
    f.write(bytes(b ^ 0xFF for b in chunk))
  return 'moma_shapes: shard', 'is corrupt'


def _remove_shard(data_dir):
  os.remove(_shard(data_dir, 'moma_digits')[0])
  return 'moma_digits: shard', 'is missing'


def _remove_validation_shard(data_dir):
  os.remove(_shard(data_dir, 'moma_pydoc', 'validation')[0])
  return 'moma_pydoc: shard', 'validation.array_record'


def _shard_of_another_size(data_dir):
  # The counts follow the installed Python, whose documentation moma_pydoc is made of.
  builder = datasets.prepare('moma_pydoc', data_dir)
  train, validation = (builder.info.splits[split] for split in ('train', 'validation'))
  shutil.copy(os.fspath(validation.filepaths[0]), os.fspath(train.filepaths[0]))
  return (f'holds {validation.num_examples} records, its dataset_info.json says '
          f'{train.num_examples}', 'moma-data build')


def _corrupt_dataset_info(data_dir):
  _, folder = _shard(data_dir, 'moma_digits')
  with open(os.path.join(folder, 'dataset_info.json'), 'w') as f:
    f.write('{"name": "moma_digits", "splits": [')
  return 'moma_digits: cannot read its dataset_info.json', 'moma-data build'


def _empty_split(data_dir):
  del data_dir
  return "moma_shapes: split 'validation[:0]' is empty", 'another split'
_empty_split.flags = ['--config.data.eval_split=validation[:0]']


def _own_dataset(builder, expected):
  def make(data_dir):
    builder(data_dir=data_dir, file_format='array_record').download_and_prepare()
    return expected
  make.dataset = builder.name
  return make


DAMAGE = [_truncate, _flip_bits, _remove_shard, _remove_validation_shard,
          _shard_of_another_size, _corrupt_dataset_info,
          _own_dataset(BadTokenIds, ('bad_token_ids/train example', 'outside')),
          _own_dataset(WrongImageShape, ('image of shape (16, 16, 3)', 'expected (32, 32, 3)')),
          _own_dataset(OtherFeatures, ("has features ['label']", "the pipeline reads")),
          _empty_split]


@pytest.fixture
def data_copy(data_setup, tmp_path):
  datasets.build_all(data_setup[0].data.data_dir)   # every dataset of the mixture
  copy = tmp_path / 'data'
  shutil.copytree(data_setup[0].data.data_dir, copy)
  return str(copy)


def _flags(config, data_dir, name=None):
  t = config.train
  flags = [f'--config.data.data_dir={data_dir}', '--config.data.vq.fit_images=600',
           '--config.model.d_model=32', '--config.model.num_layers=2',
           '--config.model.ffn_dim=128', '--config.model.max_len=64',
           '--config.data.seq_len=64', '--config.train.batch_size=8',
           f'--config.train.steps={t.steps}', f'--config.train.ckpt_every={t.ckpt_every}',
           f'--config.train.eval_every={t.eval_every}', '--config.train.eval_max_batches=1']
  if name:
    flags += [f'--config.data.name={name}']
  return flags


@pytest.mark.parametrize('damage', DAMAGE, ids=[getattr(d, 'dataset', d.__name__[1:])
                                                for d in DAMAGE])
def test_bad_data_is_one_line_exit_2_before_the_workdir(data_copy, tmp_path, capsys,
                                                        damage):
  expected = damage(data_copy)
  capsys.readouterr()
  config = tiny_train_config(data_copy, steps=4, ckpt_every=2, eval_every=4)
  workdir = tmp_path / 'run'
  argv = ['moma-train', f'--config={QUICKSTART}', f'--workdir={workdir}',
          *_flags(config, data_copy, getattr(damage, 'dataset', None)),
          *getattr(damage, 'flags', [])]
  line = train_usage_error(argv, capsys)
  for part in expected:
    assert part in line, line
  assert not workdir.exists()


def test_a_record_found_bad_mid_run_stops_it_and_a_rerun_resumes(data_copy, tmp_path,
                                                                 capsys, monkeypatch):
  """The checks pass; from the 7th training batch on a record cannot be read (as
  array_record reports a damaged chunk). One line, exit 2; checkpoints up to step 4 and
  their metrics stay; with the data readable again, the rerun resumes from step 4."""
  config = tiny_train_config(data_copy, steps=8, ckpt_every=4, eval_every=100,
                             log_every=1)
  workdir = tmp_path / 'run'
  argv = ['moma-train', f'--config={QUICKSTART}', f'--workdir={workdir}',
          *_flags(config, data_copy), '--config.train.log_every=1']
  read, steps = pipeline.DatasetDocuments.__getitem__, []
  next_batch, batches = pipeline.TrainIterator.__next__, []

  def counting(self):
    batches.append(len(batches) + 1)
    return next_batch(self)

  def failing(self, d):
    if self.split == 'train' and len(batches) >= 7:
      self.source = _Broken(self.source)
    return read(self, d)
  monkeypatch.setattr(pipeline.TrainIterator, '__next__', counting)
  monkeypatch.setattr(pipeline.DatasetDocuments, '__getitem__', failing)
  monkeypatch.setattr(train, 'train', _recording(train.train, steps))
  with pytest.raises(SystemExit) as exit_info:
    train_cli.run(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.splitlines()
  # The producer met the bad record making batch 7, ahead of the loop; the loop raises
  # it when it asks for that batch: after launching step 6 and reading step 5. So the
  # progress lines of steps 1..5, then the one line.
  assert [line.split()[1] for line in err[:-1]] == [f'{s}/8' for s in range(1, 6)], err
  assert err[-1].startswith('moma-train: error: moma_pydoc/train: cannot read example')
  assert 'moma-data build' in err[-1]
  assert ckpt_lib.Checkpoints(str(workdir)).all_steps() == [4]
  monkeypatch.setattr(pipeline.DatasetDocuments, '__getitem__', read)
  steps.clear()
  train_cli.run(argv)
  assert steps == [5, 6, 7, 8]
  with open(workdir / 'metrics.jsonl') as f:
    logged = [json.loads(line)['step'] for line in f]
  assert logged[:8] == list(range(1, 9))


class _Broken:
  """A data source whose records read as a damaged array_record chunk does."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    raise RuntimeError('Corrupted Riegeli/records file: chunk data hash mismatch')


def _recording(train_fn, steps):
  def wrapped(config, workdir, **kwargs):
    return train_fn(config, workdir, on_step=steps.append, **kwargs)
  return wrapped


def _tree(top) -> dict[str, bytes]:
  """Every file under `top` with its content: what a tool must leave unchanged."""
  out = {}
  for folder, _, files in os.walk(top):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, top)] = f.read()
  return out


TOOLS = {
    'moma-eval': lambda w: ('eval', ['--workdir', w]),
    'moma-aux': lambda w: ('aux', ['--workdir', w, '--steps', '2']),
    'moma-generate': lambda w: ('generate', ['--workdir', w, '--task', 'caption',
                                             '--validation_images', '1']),
    'moma-data': lambda w: ('data', []),     # its experiment file is made in the test
}


@pytest.mark.parametrize('tool', sorted(TOOLS))
def test_the_other_tools_say_one_line_and_change_nothing(tool, trained_run, data_copy,
                                                         tmp_path, capsys):
  """A truncated validation shard (and a truncated train shard) under a copy of a trained
  run: moma-eval, moma-aux, moma-generate and moma-data build each end with exit 2 and
  one line naming the shard, and leave the run directory as it was."""
  import importlib
  from moma_jax import run_dir
  for split in ('train', 'validation'):
    path, _ = _shard(data_copy, 'moma_shapes', split)
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained_run[1], workdir)
  config = run_dir.read_config_json(workdir)
  config['data']['data_dir'] = data_copy
  run_dir.write_json(os.path.join(workdir, run_dir.CONFIG_FILE), config)
  before = _tree(workdir)
  module, args = TOOLS[tool](workdir)
  if tool == 'moma-data':        # takes an experiment file: the run's data, as a file
    exp = tmp_path / 'exp.py'
    exp.write_text('from moma_jax import configs\n'
                   'def get_config(arg=None):\n'
                   '  c = configs.default_config()\n'
                   f'  c.data.data_dir = {data_copy!r}\n'
                   f'  c.data.vq.fit_images = {config["data"]["vq"]["fit_images"]}\n'
                   '  return c\n')
    args = ['build', '--config', str(exp)]
  cli_module = importlib.import_module(f'moma_jax.cli.{module}')
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    cli_module.run([tool, *args])
  err = capsys.readouterr().err.strip()
  assert exit_info.value.code == 2, err
  assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
  assert 'moma_shapes' in err and 'corrupt' in err, err
  assert _tree(workdir) == before
