"""Command-line errors end as one line `moma-flops: error: ...` and exit code 2.

Each case runs `python -m moma_jax.cli.flops` in a subprocess, as a user would; the
FLOPs tool imports no JAX, so each run takes well under a second.
"""
import os
import subprocess
import sys

import pytest

from moma_jax.cli import flops as flops_cli

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
TABLE1 = 'experiments/paper_table1.py'


def moma_flops(*args):
  return subprocess.run([sys.executable, '-m', 'moma_jax.cli.flops', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60,
                        env={**os.environ, 'MOMA_TRACEBACK': ''})


@pytest.mark.parametrize('args,expected', [
    (['--config', 'experiments/no_such_file.py:x'], "no such config file"),
    ([f'--config={TABLE1}:moma_9x_90m'], 'valid: [mod_]{dense|moe_8x'),
    (['--config', f'{TABLE1}:dense_90m', '--config.model.d_model=0'],
     'model.d_model: must be a positive integer, got 0'),
    (['--config', f'{TABLE1}:dense_90m', '--config.model.num_heads=7'],
     'model.num_heads: 7 heads do not divide d_model=512'),
    (['--config', f'{TABLE1}:moma_4t4i_90m', '--config.model.capacity=(1.5,)'],
     'model.capacity: must be in (0, 1], got 1.5'),
    (['--config', f'{TABLE1}:moma_4t4i_90m', '--config.model.experts=(4, 4, 4)'],
     'model.experts: moma needs 2 entries'),
    (['--config', f'{TABLE1}:moma_4t4i_90m', '--config.model.ffn=swiglu'],
     "model.ffn: must be one of 'dense', 'moma', 'moe', 'topk', got 'swiglu'"),
    (['--config', f'{TABLE1}:dense_90m', '--jsn'], "Unknown command line flag 'jsn'"),
    (['--config', f'{TABLE1}:dense_90m', '--config.model.d_model=big'],
     'flag --config.model.d_model=big: invalid literal'),
    (['--config', f'{TABLE1}:dense_90m', '--config.model.widht=3'],
     "--config.model.widht: no such config field 'widht'"),
    (['--config', 'moma_jax/configs/model.py'], "has no attribute 'get_config'"),
    (['--config', f'{TABLE1}:moe_8x_90m', '--config.routing.capacity_factor=2.0'],
     'routing.capacity_factor: is now routing.buffer_factor: set that instead'),
    (['--config', f'{TABLE1}:dense_90m', '--config.model.capacity_factor=2.0'],
     'model.capacity_factor: is now model.topk_capacity_factor'),
    (['--config', f'{TABLE1}:dense_90m', '--config.routing.ep_capacity_factor=2.0'],
     'routing.ep_capacity_factor: is now routing.ep_buffer_factor'),
    (['--config', f'{TABLE1}:dense_90m', '--config.train.nan_steps=(3,)'],
     'train.nan_steps: was removed'),
    ([], '--config FILE[:ARG] is required'),
])
def test_user_errors_are_one_line_and_exit_2(args, expected):
  result = moma_flops(*args)
  assert result.returncode == 2, result
  lines = result.stderr.splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('moma-flops: error: '), lines[0]
  assert expected in lines[0], lines[0]
  assert result.stdout == ''


def test_table_and_overrides():
  result = moma_flops('--config', f'{TABLE1}:moma_4t4i_90m', '--config.model.num_layers=4')
  assert result.returncode == 0, result.stderr
  assert 'moma (4, 4), 4 layers' in result.stdout
  assert 'compute-matched dense: dense, 4 layers' in result.stdout
  assert result.stderr == ''


def test_help_exits_0():
  result = moma_flops('--help')
  assert result.returncode == 0 and '--config' in result.stdout and '--[no]json' in (
      result.stdout)


def test_repeated_runs_in_one_process(capsys):
  """Overrides of an earlier run neither leak into nor break a later one."""
  flops_cli.run(['moma-flops', f'--config={TABLE1}:dense_90m', '--config.model.num_layers=2'])
  assert 'dense, 2 layers' in capsys.readouterr().out
  flops_cli.run(['moma-flops', f'--config={TABLE1}:dense_90m'])
  assert 'dense, 8 layers' in capsys.readouterr().out
  with pytest.raises(SystemExit) as exit_info:
    flops_cli.run(['moma-flops', f'--config={TABLE1}:dense_90m', '--config.model.d_model=0'])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.count('\n') == 1


def test_runlocal_shrinks_any_experiment_but_keeps_explicit_overrides():
  from moma_jax.cli import command as cli
  from moma_jax import configs
  argv = ['moma-flops', '--config=experiments/paper_table1.py:mod_moma_4t4i_1.4b',
          '--config.runlocal=True', '--config.train.steps=7']
  config = cli.parse(argv, 'moma-flops')
  m, t = config.model, config.train
  # The kind of model stays: MoMa 4t4i with MoD from layer 0, every 2nd layer.
  assert (m.ffn, tuple(m.experts), m.mod.enabled, m.mod.every) == ('moma', (4, 4), True, 2)
  assert (m.d_model, m.num_layers, m.vocab_size, config.data.seq_len) == (
      64, 4, configs.default_config().model.vocab_size, 128)
  assert t.steps == 7 and t.batch_size == 16   # the command line's steps, not 100
  full = cli.parse(argv[:2], 'moma-flops')
  assert full.model.d_model == 2304 and full.train.steps > 10**5


@pytest.mark.parametrize('mesh_args,expected', [
    (['--config.mesh.fsdp=3'], 'mesh: data=1 x fsdp=3 x expert=1 x tensor=1 is 3 devices'),
    (['--config.mesh.fsdp', 'two'], "--config.mesh.fsdp: must be an integer"),
    (['--config.model.d_model=64'], '--config.model.d_model: this tool reads the config of '
                                    'the run directory; only the mesh can be set'),
])
def test_run_directory_tools_take_only_the_mesh(mesh_args, expected, tmp_path, capsys):
  """moma-eval (like moma-aux and moma-generate) reads its config from the run; on the
  command line only --config.mesh.* may change, and a bad one is one line, exit 2."""
  from moma_jax import configs
  from moma_jax.cli import eval as eval_cli
  (tmp_path / 'config.json').write_text(configs.default_config().to_json())
  with pytest.raises(SystemExit) as exit_info:
    eval_cli.run(['moma-eval', f'--workdir={tmp_path}', *mesh_args])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and err.count('\n') == 1, err
  assert err.startswith('moma-eval: error: ') and expected in err, err


def test_a_host_without_accelerators_starts_no_tpu_runtime(tmp_path):
  """With libtpu installed (the test extra) and no JAX_PLATFORMS, a command that counts
  this host's devices prints its one error line and nothing from libtpu's start-up."""
  pytest.importorskip('libtpu')
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  result = subprocess.run(
      [sys.executable, '-m', 'moma_jax.cli.train', '--config=experiments/quickstart.py:dense',
       f'--workdir={tmp_path / "run"}', '--config.mesh.data=3'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env={**env, 'MOMA_TRACEBACK': ''})
  assert result.returncode == 2, result.stderr
  assert result.stderr.splitlines() == [
      'moma-train: error: mesh: data=3 x fsdp=1 x expert=1 x tensor=1 is 3 devices, but '
      'there are 1'], result.stderr



def test_renamed_fields_are_refused_in_experiment_files_and_read_in_saved_runs():
  from moma_jax import configs
  from moma_jax import renamed_fields
  config = configs.default_config()
  config.routing.capacity_factor = 2.0          # an experiment file written before
  with pytest.raises(configs.ConfigError, match='routing.buffer_factor'):
    configs.validate(config)
  saved = configs.default_config().to_dict()
  saved['model']['capacity_factor'] = saved['model'].pop('topk_capacity_factor') + 1
  saved['routing']['capacity_factor'] = 3.0
  del saved['routing']['buffer_factor']
  saved['train']['nan_steps'] = [3]
  upgraded = renamed_fields.upgrade_saved(saved)
  assert upgraded['model']['topk_capacity_factor'] == 2.25
  assert upgraded['routing']['buffer_factor'] == 3.0
  assert 'nan_steps' not in upgraded['train'] and 'capacity_factor' not in upgraded['model']
  assert saved['train']['nan_steps'] == [3]      # the argument is left as it was
  assert renamed_fields.upgrade_saved(configs.default_config().to_dict()) == \
      configs.default_config().to_dict()
