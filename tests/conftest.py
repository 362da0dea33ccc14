"""Shared test set-up: a persistent JAX compilation cache and small config builders."""
import os

import jax
import pytest

# One compilation cache for the suite and every process its tests start (moma-train
# subprocesses killed and resumed, the 8-device suite, notebook kernels inherit the
# environment): a program one of them compiled, the others load.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.expanduser('~/.cache/moma_jax/jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))

from moma_jax import configs  # noqa: E402

# tests/multidevice needs 8 devices, fixed when JAX starts: tests/test_sharding.py runs
# it in a process of its own (MOMA_MULTIDEVICE=1 with 8 fake CPU devices).
collect_ignore = [] if os.environ.get('MOMA_MULTIDEVICE') == '1' else ['multidevice']


FIRST = 'tests/test_sharding.py::test_on_eight_devices'


def pytest_collection_modifyitems(items):
  """The 8-device sub-suite (a fifth of the suite's time, in one test) first: xdist hands
  tests out in this order, so it starts at once beside the rest instead of ending the
  run alone on one worker. It has no module fixture that a move could split."""
  items.sort(key=lambda item: item.nodeid != FIRST)


def pytest_runtest_setup(item):
  """Under `--dist loadgroup` (the README's command) pytest-xdist schedules a test marked
  xdist_group by the `@group` it appends to the node id; a pytest/xdist pair that drops the
  suffix would build the group's shared runs on every worker, minutes each, silently."""
  if (getattr(item.config.option, 'loadgroup', False)     # set on xdist's workers
      and item.get_closest_marker('xdist_group') is not None and '@' not in item.nodeid):
    pytest.fail(f'marked xdist_group, but pytest {pytest.__version__} with this '
                'pytest-xdist does not group it under --dist loadgroup', pytrace=False)


def jit_vjp(f, cotangent):
  """jit(params, x -> (f's output, f's aux, gradients of <output, cotangent>))."""
  @jax.jit
  def run(params, x):
    y, pullback, aux = jax.vjp(f, params, x, has_aux=True)
    return y, aux, pullback(cotangent)
  return run


def train_usage_error(argv, capsys) -> str:
  """Runs moma-train with argv, asserts exit 2 with one stderr line, returns that line."""
  from moma_jax.cli import train as train_cli  # imported late: it defines absl flags
  with pytest.raises(SystemExit) as exit_info:
    train_cli.run(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('moma-train: error: '), err
  return err


def tiny_config(ffn='moma', experts=(4, 4), **model_overrides):
  """A validated tiny config: d 32, 2 heads, 1 layer, seq 16, groups of 2 sequences."""
  c = configs.default_config()
  c.model.d_model, c.model.num_heads, c.model.num_layers = 32, 2, 1
  c.model.ffn_dim, c.model.vocab_size, c.model.max_len = 48, 64, 32
  c.model.ffn, c.model.experts = ffn, tuple(experts)
  for key, value in model_overrides.items():
    target = c.model
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  c.data.seq_len = 16
  c.routing.group_size = 2
  c.train.batch_size = 4
  return configs.validate(c)


@pytest.fixture
def make_config():
  return tiny_config


def small_data_config(data_dir):
  """The default data mixture at seq 128, batch 8, with a VQ fitted on 600 images."""
  c = configs.default_config()
  c.data.data_dir = str(data_dir)
  c.data.seq_len = 128
  c.data.vq.fit_images = 600
  c.train.batch_size = 8
  return configs.validate(c)


@pytest.fixture(scope='session')
def data_setup(tmp_path_factory):
  """(config, tokenizers) over embedded datasets built once per test process."""
  from moma_jax.data import pipeline
  config = small_data_config(tmp_path_factory.mktemp('data'))
  return config, pipeline.load_tokenizers(config)


def tiny_train_config(data_dir, variant='moma_4t4i', group_size=None, **train_overrides):
  """The quickstart experiment shrunk to seconds on a CPU: d 32, 2 layers, seq 64,
  batch 8, 30 steps at lr 3e-3; one metrics row per step, checkpoints every 10 steps.
  group_size: `routing.group_size` (default the experiment's); train_overrides: train.*."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      'quickstart', os.path.join(os.path.dirname(__file__), '..', 'experiments',
                                 'quickstart.py'))
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)
  c = quickstart.get_config(variant)
  c.data.data_dir = str(data_dir)
  c.data.vq.fit_images = 600          # the VQ that data_setup fits
  c.model.d_model, c.model.num_layers, c.model.ffn_dim = 32, 2, 128
  c.model.max_len = c.data.seq_len = 64
  c.train.batch_size = 8
  t = c.train
  t.steps, t.log_every, t.eval_every, t.ckpt_every, t.eval_max_batches = 30, 1, 15, 10, 6
  t.warmup, t.lr = 5, 3e-3
  for key, value in train_overrides.items():
    t[key] = value
  if group_size is not None:
    c.routing.group_size = group_size
  return configs.validate(c)


@pytest.fixture
def nan_at_steps(monkeypatch):
  """install(config, steps): the loss of those 1-based training steps becomes NaN.

  The fault goes in through the model's objective (transformer.loss_fn), the seam the
  training step calls: the patched objective knows its step by the router-noise key the
  step hands it (step.noise_key), so the compiled step is the program's own.
  """
  import jax
  import jax.numpy as jnp
  from moma_jax.model import transformer
  from moma_jax.training import step as step_lib

  def install(config, steps):
    assert config.train.grad_accum == 1, 'micro-batches fold their index into the key'
    keys = jnp.stack([jax.random.key_data(step_lib.noise_key(config, jnp.int32(s)))
                      for s in steps])
    real = transformer.loss_fn

    def loss_fn(model, params, batch, rng=None, z_loss=0.0):
      value, metrics = real(model, params, batch, rng, z_loss)
      if rng is None:                     # evaluation: no step, no fault
        return value, metrics
      hit = jnp.any(jnp.all(jax.random.key_data(rng) == keys, axis=-1))
      factor = jnp.where(hit, jnp.float32(jnp.nan), jnp.float32(1))
      return value * factor, {**metrics, 'loss': metrics['loss'] * factor}

    monkeypatch.setattr(transformer, 'loss_fn', loss_fn)

  return install


@pytest.fixture(scope='session')
def trained_run(data_setup, tmp_path_factory):
  """(config, workdir, metrics rows) of one tiny quickstart run shared by every test."""
  from moma_jax.training import metrics_log
  from moma_jax.training import trainer as train
  config = tiny_train_config(data_setup[0].data.data_dir)
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  train.train(config, workdir)
  return config, workdir, metrics_log.read_rows(workdir)


@pytest.fixture(scope='session')
def aux_run(data_setup, tmp_path_factory):
  """(config, workdir) of a moma_4t4i run at the quickstart setting's test size (d 64,
  seq 128, 100 steps, about 30 s) with post-hoc auxiliary routers (moma-aux, 300 steps).

  Apart from `trained_run`: its 30 steps of d 32 leave expert choice nearly random, and
  the routers' balanced accuracy there stays near 0.88 (measured); here it is 0.92."""
  from moma_jax.cli import aux as aux_cli
  from moma_jax.training import trainer as train
  config = tiny_train_config(data_setup[0].data.data_dir, steps=100, log_every=10,
                             eval_every=100, ckpt_every=100)
  config.model.d_model, config.model.ffn_dim = 64, 256
  config.model.max_len = config.data.seq_len = 128
  workdir = str(tmp_path_factory.mktemp('aux_run') / 'run')
  train.train(configs.validate(config), workdir)
  try:
    aux_cli.run(['moma-aux', '--workdir', workdir, '--steps', '300', '--lr', '3e-3'])
  except SystemExit as e:
    assert e.code in (0, None), e.code
  return config, workdir
