"""The README's worked example: a researcher's own TFDS data, read by name, trains."""
import copy
import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import optax

from moma_jax.data import pipeline
from moma_jax.model import transformer

ROOT = os.path.join(os.path.dirname(__file__), '..')


def load_example():
  spec = importlib.util.spec_from_file_location('my_corpus', os.path.join(ROOT, 'examples',
                                                                         'my_corpus.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_own_datasets_train_a_few_steps(data_setup):
  config, tok = data_setup
  load_example().build(config.data.data_dir)

  tokens_config = copy.deepcopy(config)
  tokens_config.data.name = 'my_tokens'
  batch = next(pipeline.train_iterator(tokens_config, tok))
  assert set(np.unique(batch['modality'])) == {0}
  text = bytes(int(t) - 5 for t in batch['tokens'][0] if t >= 5).decode()
  assert 'document number' in text

  config = copy.deepcopy(config)
  config.data.name = 'my_captions'
  m = config.model
  m.d_model, m.num_heads, m.num_layers, m.ffn_dim, m.experts = 32, 2, 1, 64, (2, 2)
  config.routing.group_size = 4
  model = transformer.build(config)
  params, _ = transformer.init(model, jax.random.key(0))
  optimizer = optax.adamw(3e-3)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    (_, metrics), grads = jax.value_and_grad(
        lambda p: transformer.loss_fn(model, p, batch), has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  batches = pipeline.train_iterator(config, tok)
  losses = []
  for _ in range(8):
    batch = next(batches)
    assert set(np.unique(batch['modality'])) == {0, 1}
    params, opt_state, metrics = step(params, opt_state, batch)
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < losses[0] - 0.5, losses


def test_data_cli_reports_bad_input_in_one_line(data_setup, tmp_path):
  config, _ = data_setup
  run = lambda *args: subprocess.run(
      [sys.executable, '-m', 'moma_jax.cli.data', args[0],
       '--config', os.path.join(ROOT, 'experiments', 'quickstart.py'), *args[1:]],
      capture_output=True, text=True, timeout=120)
  unknown = run('preview', f'--config.data.data_dir={config.data.data_dir}',
                '--config.data.name=no_such_data', f'--out={tmp_path / "p.png"}')
  assert unknown.returncode == 2
  assert unknown.stderr.strip().splitlines() == [
      unknown.stderr.strip()] and "unknown dataset 'no_such_data'" in unknown.stderr
  blocked = tmp_path / 'file'
  blocked.write_text('')
  unwritable = run('build', f'--config.data.data_dir={blocked / "data"}')
  assert unwritable.returncode == 2 and 'not writable' in unwritable.stderr
  assert len(unwritable.stderr.strip().splitlines()) == 1
  bad_action = run('explode')
  assert bad_action.returncode == 2
