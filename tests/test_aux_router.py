"""Auxiliary routers: their targets and counts, the post-hoc stage (moma-aux), joint mode."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_train_config
from moma_jax.cli import aux as aux_cli
from moma_jax.inference import aux_store
from moma_jax.inference import saved_run
from moma_jax.model import aux_router
from moma_jax.model import routing
from moma_jax import run_dir as run_dir_lib
from moma_jax.training import metrics_log
from moma_jax.training import trainer as train


# One test process builds the shared aux_run fixture for both files (--dist loadgroup).
pytestmark = pytest.mark.xdist_group('aux_run')


def test_taken_mask_marks_exactly_the_wanted_candidates():
  scores = jnp.asarray([[[0.9, 0.1], [0.2, 0.8], [0.7, 0.6], [0.1, 0.3]]])   # [1, 4, 2]
  eligible = jnp.asarray([[True, True, True, False]])[..., None]
  sel = routing.expert_choice(scores, eligible, routing.fractions.Fraction(1, 2))
  taken = aux_router.taken_mask(sel.idx, sel.wanted, 4)
  # ceil(3 / 2) = 2 tokens per expert among the 3 eligible: expert 0 takes 0, 2;
  # expert 1 takes 1, 2; token 3 (not eligible) is never taken.
  np.testing.assert_array_equal(taken[0], [[1, 0], [0, 1], [1, 1], [0, 0]])


def test_counts_and_rates_by_hand():
  class One(aux_router.AuxRouter):
    pass
  logits = jnp.asarray([[2.0, -1.0], [0.5, 3.0], [-2.0, -0.5]])      # predictions 10/11/00
  target = jnp.asarray([[True, True], [False, True], [False, False]])
  eligible = jnp.asarray([True, True, False])[:, None]               # row 3 does not count
  module = One(2)
  _, state = module.apply({}, logits, target, eligible, 'text', method=One.score,
                          mutable=[aux_router.COLLECTION])
  r = aux_router.summarize(state[aux_router.COLLECTION])
  # Over rows 1-2: tp = 2 (1,1 and 2,2), fp = 1 (2,1), fn = 1 (1,2), tn = 0.
  assert float(r['aux_router/accuracy/text']) == pytest.approx(2 / 4)
  assert float(r['aux_router/precision']) == pytest.approx(2 / 3)
  assert float(r['aux_router/recall']) == pytest.approx(2 / 3)
  assert float(r['aux_router/balanced_accuracy']) == pytest.approx((2 / 3 + 0) / 2)
  # Only positives (1t1i: every token is taken): balanced accuracy is the recall.
  only = aux_router.rates({'text': dict(bce_sum=0.0, count=4.0, tp=3.0, fp=0.0, fn=1.0,
                                        tn=0.0)})
  assert float(only['aux_router/balanced_accuracy']) == pytest.approx(0.75)
  z, y = np.asarray([2.0, -1.0, 0.5, 3.0]), np.asarray([1, 1, 0, 1])
  bce = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
  assert float(r['aux_router/loss']) == pytest.approx(bce.mean(), rel=1e-6)


@pytest.fixture(scope='module')
def post_hoc(aux_run):
  """The shared run with post-hoc routers (conftest.aux_run) and their result."""
  return aux_run[1], aux_store.read_result(aux_run[1])


def _run_cli(args):
  try:
    aux_cli.run(['moma-aux', *args])
  except SystemExit as e:
    assert e.code in (0, None), e.code


def test_post_hoc_routers_predict_the_group_decisions(post_hoc):
  run_dir, result = post_hoc
  # On validation data, against the teacher-forced top-k decisions.
  assert result['aux_router/balanced_accuracy'] >= 0.90, result
  for mod in ('text', 'image'):
    assert result[f'gap/{mod}'] == pytest.approx(
        result[f'eval_causal/loss/{mod}'] - result[f'eval/loss/{mod}'])
    assert result[f'gap_calibrated/{mod}'] == pytest.approx(
        result[f'eval_causal_calibrated/loss/{mod}'] - result[f'eval/loss/{mod}'])
  rows = metrics_log.read_rows(aux_store.directory(run_dir))
  train_rows = [r for r in rows if 'aux_router/loss' in r and 'eval/loss' not in r]
  assert train_rows[-1]['aux_router/loss'] < train_rows[0]['aux_router/loss']


def test_post_hoc_stage_leaves_the_model_alone_and_loads_with_it(post_hoc):
  run_dir, result = post_hoc
  # The frozen model evaluates exactly as the trainer's own last evaluation did.
  last_eval = [r for r in metrics_log.read_rows(run_dir) if 'eval/loss' in r][-1]
  for key in ('eval/loss', 'eval/loss/text', 'eval/loss/image'):
    assert result[key] == pytest.approx(last_eval[key], rel=1e-5), key
  before = saved_run.load(run_dir, with_aux_routers=False)
  after = saved_run.load(run_dir)
  assert not before.model.mode.aux_routers and after.model.mode.aux_routers
  main, aux = aux_store.split(after.params)
  jax.tree.map(np.testing.assert_array_equal, main, before.params)
  assert jax.tree.leaves(aux)
  assert result['run_step'] == after.step == 100


def test_a_finished_stage_is_reused(post_hoc, capsys):
  run_dir, result = post_hoc
  stamp = os.path.getmtime(os.path.join(aux_store.directory(run_dir), aux_store.RESULT_FILE))
  _run_cli(['--workdir', run_dir, '--json'])
  assert json.loads(capsys.readouterr().out) == result
  assert os.path.getmtime(os.path.join(aux_store.directory(run_dir),
                                       aux_store.RESULT_FILE)) == stamp


@pytest.mark.parametrize('args, message', [
    ([], '--workdir DIR is required'),
    (['--workdir', '/nonexistent/run'], 'not a training run'),
    (['--steps', '0'], '--steps must be >= 1'),
    (['--calibration_tokens', '0'], '--calibration_tokens must be >= 1'),
    (['--dense'], 'routes causally already'),
])
def test_bad_input_exits_2_with_one_line(args, message, data_setup, tmp_path, capsys,
                                         trained_run):
  if args[:1] in (['--steps'], ['--calibration_tokens']):
    args = ['--workdir', trained_run[1], *args]
  if args == ['--dense']:
    config = tiny_train_config(data_setup[0].data.data_dir, 'dense', steps=1)
    os.makedirs(tmp_path / 'dense')
    with open(tmp_path / 'dense' / 'config.json', 'w') as f:
      f.write(config.to_json())
    args = ['--workdir', str(tmp_path / 'dense')]
  with pytest.raises(SystemExit) as exit_info:
    aux_cli.run(['moma-aux', *args])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0], err


def test_joint_routers_train_with_the_model_and_leave_it_unchanged(data_setup, tmp_path):
  base = tiny_train_config(data_setup[0].data.data_dir, 'mod_moma_4t4i', steps=6,
                           eval_every=6, log_every=1)
  joint = tiny_train_config(data_setup[0].data.data_dir, 'mod_moma_4t4i', steps=6,
                            eval_every=6, log_every=1)
  joint.model.aux_router.enabled, joint.model.aux_router.mode = True, 'joint'
  train.train(base, str(tmp_path / 'base'))
  train.train(joint, str(tmp_path / 'joint'))
  a, b = (metrics_log.read_rows(str(tmp_path / n)) for n in ('base', 'joint'))
  # Stop-gradient inputs: the model trains exactly as without the routers.
  np.testing.assert_allclose([r['loss'] for r in a if 'loss' in r],
                             [r['loss'] for r in b if 'loss' in r], rtol=1e-5)
  assert all('aux_router/balanced_accuracy' in r for r in b if 'loss' in r)
  assert 'eval_causal/loss/image' in b[-1] and 'eval_causal/loss' not in a[-1]


def test_moma_eval_causal_gives_the_stage_s_causal_losses(post_hoc, capsys):
  from moma_jax.cli import eval as eval_cli
  run_dir, result = post_hoc
  eval_cli.run(['moma-eval', f'--workdir={run_dir}', '--causal', '--json'])
  got = json.loads(capsys.readouterr().out)
  for mode in ('eval_causal', 'eval_causal_calibrated'):
    for key in (f'{mode}/loss', f'{mode}/loss/text', f'{mode}/loss/image',
                f'flops/{mode}', f'flops/{mode}/image'):
      assert got[key] == pytest.approx(result[key], rel=1e-5), key
  eval_cli.run(['moma-eval', f'--workdir={run_dir}', '--causal'])
  out = capsys.readouterr().out
  assert 'threshold 0.5' in out and 'compute-matched' in out


def test_calibrated_thresholds_spend_the_training_capacity_on_held_out_data(post_hoc):
  _, result = post_hoc
  # Measured on mixed validation batches; calibrated on training batches.
  shares = {k: v for k, v in result.items()
            if k.startswith('usage/eval_causal_calibrated/share/') and k.count('/') == 5}
  assert len(shares) == 2 * 2, shares          # 2 layers x (text, image) routers
  for key, share in shares.items():
    assert len(share) == 4, key                # 4t4i: 4 experts per group, capacity 1/4
    np.testing.assert_allclose(share, 0.25, atol=0.03, err_msg=key)
  # Each expert then takes one expert's worth per token, as in training: the causal
  # forward FLOPs are the teacher-forced ones plus the auxiliary routers, within 2%.
  for suffix in ('', '/text', '/image'):
    matched = result[f'flops/eval_causal_calibrated{suffix}']
    aux = result[f'flops/eval_causal_calibrated/aux_routers{suffix}']
    assert matched - aux == pytest.approx(result[f'flops/eval{suffix}'], rel=0.02)


def test_load_keeps_half_thresholds_unless_asked(post_hoc):
  import moma_jax
  from moma_jax.inference import thresholds
  run_dir, result = post_hoc
  half, calibrated = moma_jax.load(run_dir), moma_jax.load(run_dir,
                                                           causal_thresholds='calibrated')
  assert all(np.all(t == 0) for t in thresholds.read(half.params).values())
  got = thresholds.summary(calibrated.params)
  assert got.keys() == {k for k in result if k.startswith('threshold/')}
  for key, value in got.items():
    np.testing.assert_allclose(value, result[key], rtol=1e-6)
  main_half, _ = aux_store.split(half.params)
  jax.tree.map(np.testing.assert_array_equal, main_half, aux_store.split(calibrated.params)[0])


def test_calibrated_thresholds_without_a_stage_are_refused(trained_run):
  import moma_jax
  with pytest.raises(run_dir_lib.RunDirError, match='moma-aux --workdir'):
    moma_jax.load(trained_run[1], causal_thresholds='calibrated')


def test_moma_eval_causal_without_routers_exits_2(trained_run, capsys):
  from moma_jax.cli import eval as eval_cli
  with pytest.raises(SystemExit) as exit_info:
    eval_cli.run(['moma-eval', f'--workdir={trained_run[1]}', '--causal'])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'moma-aux --workdir' in err[0], err
