"""Evaluation routed as training routes: mixed validation batches, per-dataset losses
from the same forward pass, and the bias of reading one dataset at a time."""
import numpy as np
import pytest

from conftest import tiny_train_config
from moma_jax import configs
from moma_jax.data import pipeline
from moma_jax.data import vocab as vocab_lib


def _mixed(config, tok, n=None):
  import itertools
  return list(itertools.islice(pipeline.mixed_eval_batches(config, tok), n))


def test_mixed_batches_are_fixed_mix_by_weight_and_carry_their_dataset(data_setup):
  config, tok = data_setup
  batches = _mixed(config, tok)
  again = _mixed(config, tok, 3)
  assert len(batches) > 3
  for a, b in zip(batches, again):                       # every evaluation, the same tokens
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  names = [n for n, _ in configs.mixture(config.data)]
  weights = np.array([w for _, w in configs.mixture(config.data)])
  stack = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  real = stack['segment_ids'] > 0
  assert set(np.unique(stack['dataset'][real])) == set(range(len(names)))
  # Documents (one <bos> each) per dataset follow the mixture's weights.
  docs = np.array([((stack['tokens'] == vocab_lib.BOS) & real
                    & (stack['dataset'] == k)).sum() for k in range(len(names))])
  np.testing.assert_allclose(docs / docs.sum(), weights / weights.sum(), atol=2 / docs.sum())
  # A dataset's tokens are its split's: text-only pydoc holds no image tokens.
  pydoc = real & (stack['dataset'] == names.index('moma_pydoc'))
  assert (stack['modality'][pydoc] == 0).all()


@pytest.fixture(scope='module')
def eval_setup(data_setup):
  """(config, tok, one mixed batch on the device) for the tiny quickstart shapes."""
  import jax.numpy as jnp
  base, tok = data_setup
  config = tiny_train_config(base.data.data_dir)
  batch = _mixed(config, tok, 1)[0]
  return config, tok, {k: jnp.asarray(v) for k, v in batch.items()}


def _model(config, ffn):
  import jax
  from moma_jax.model import transformer
  config = configs.validate(config.copy_and_resolve_references())
  if ffn == 'dense':
    config.model.ffn = 'dense'
  model = transformer.build(configs.validate(config))
  params, _ = transformer.init(model, jax.random.key(3))
  return config, model, params


def _only(batch, k):
  """`batch` with every token of another dataset made padding: dataset k alone, in the
  same rows and positions (evaluated one dataset at a time)."""
  mine = batch['dataset'] == k
  return {**batch, 'segment_ids': batch['segment_ids'] * mine,
          'loss_mask': batch['loss_mask'] * mine}


@pytest.mark.parametrize('ffn', ['moma', 'dense'])
def test_per_dataset_losses_come_from_the_training_forward_pass(eval_setup, ffn):
  """Routed: each dataset's loss equals its tokens' loss in a training-style forward
  pass of the whole batch (the same routing groups); read one dataset at a time, the
  groups change and so does the loss. Dense: nothing is routed, so reading one dataset
  at a time gives the same losses."""
  import jax
  from moma_jax.model import transformer
  from moma_jax.runs import evaluation
  config, _, batch = eval_setup
  config, model, params = _model(config, ffn)
  names = evaluation.datasets_of(config)
  step = evaluation.make_eval_step(model, config.model.modalities, names)
  got = jax.device_get(step(params, batch))
  training_pass = jax.jit(lambda b: transformer.loss_fn(model, params, b)[1])
  alone = []
  for k, name in enumerate(names):
    mask = batch['loss_mask'] * (batch['dataset'] == k)
    if not int(mask.sum()):
      continue
    training = training_pass({**batch, 'loss_mask': mask})
    np.testing.assert_allclose(got[f'{name}/loss'], training['loss'], rtol=1e-6)
    assert int(got[f'{name}/tokens']) == int(training['tokens'])
    one = training_pass(_only(batch, k))
    alone.append((float(got[f'{name}/loss']), float(one['loss'])))
  assert len(alone) >= 2
  mixed, separate = np.array(alone).T
  if ffn == 'dense':
    np.testing.assert_allclose(mixed, separate, rtol=1e-5)
  else:
    assert np.abs(mixed - separate).max() > 1e-4, alone   # who shares a group matters


def test_evaluate_pools_the_mixture_and_keeps_the_split_diagnostic(eval_setup):
  import jax
  from moma_jax.runs import evaluation
  config, tok, _ = eval_setup
  config, model, params = _model(config, 'moma')
  config.train.eval_max_batches = 2
  names = evaluation.datasets_of(config)
  mods = config.model.modalities
  out = evaluation.evaluate(evaluation.make_eval_step(model, mods, names), params,
                            config, tok)
  # The headline is the mixture's: every dataset's tokens of the same batches, pooled.
  step = evaluation.make_eval_step(model, mods, names)
  sums = counts = 0.0
  for batch in _mixed(config, tok, 2):
    m = jax.device_get(step(params, evaluation.to_device(batch)))
    sums += sum(float(m[f'{n}/loss']) * int(m[f'{n}/tokens']) for n in names)
    counts += sum(int(m[f'{n}/tokens']) for n in names)
  np.testing.assert_allclose(out['eval/loss'], sums / counts, rtol=1e-6)
  assert {f'eval/{n}/loss' for n in names} <= set(out)
  split = evaluation.evaluate_per_split(evaluation.make_eval_step(model, mods), params,
                                        config, tok)
  assert set(split) >= {f'eval_split/{n}/loss' for n in names}
  assert not any(k.startswith('eval/') for k in split)
