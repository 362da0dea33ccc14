"""model.kernels='pallas' (interpret mode here) trains exactly like 'xla'.

The kernels themselves are checked against their references in test_pallas_kernels.py;
here a whole training step of the model: same routing, same loss, same gradients (so
the same AdamW update). On the data=2 x expert=4 mesh: tests/multidevice.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from moma_jax.model import names
from moma_jax.model import transformer


def step_results(config):
  """(loss, metrics, gradients, selections) of one training step from a fixed init."""
  model = transformer.build(config)
  params, _ = transformer.init(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  b, l = config.train.batch_size, config.data.seq_len
  modality = (rng.random((b, l)) < 0.5).astype(np.int8)
  segment = np.ones((b, l), np.int32)
  segment[0, -4:] = 0
  batch = dict(tokens=jnp.asarray(rng.integers(0, config.model.vocab_size, (b, l)), jnp.int32),
               modality=jnp.asarray(modality), segment_ids=jnp.asarray(segment),
               positions=jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)),
               loss_mask=jnp.asarray(segment))

  @jax.jit
  def run(params, batch):
    (value, metrics), grads = jax.value_and_grad(
        lambda p: transformer.loss_fn(model, p, batch), has_aux=True)(params)
    _, sown = model.apply({'params': params}, batch['tokens'], batch['modality'],
                          batch['segment_ids'], batch['positions'],
                          mutable=list(names.ANALYSIS))
    return value, metrics, grads, sown['intermediates']
  return jax.device_get(run(params, batch))


@pytest.mark.parametrize('variant', [
    dict(ffn='moma', experts=(2, 2), **{'mod.enabled': True, 'num_layers': 2}),
    dict(ffn='moe', experts=(4,), layout='capacity'),
    dict(ffn='topk', experts=(4,)),
])
def test_pallas_step_equals_xla_step(variant):
  variant = dict(variant)
  layout = variant.pop('layout', 'ragged')
  results = {}
  for kernels in ('xla', 'pallas'):
    config = tiny_config(**variant, kernels=kernels)
    config.routing.layout = layout
    results[kernels] = step_results(config)
  (v_x, m_x, g_x, s_x), (v_p, m_p, g_p, s_p) = results['xla'], results['pallas']
  flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v)
                    for k, v in jax.tree_util.tree_leaves_with_path(t)}
  s_x, s_p = flat(s_x), flat(s_p)
  assert s_x.keys() == s_p.keys() and any('selection' in k for k in s_x)
  for key in s_x:
    if key.endswith("['idx']") or key.endswith("['kept']") or key.endswith('token_index'):
      np.testing.assert_array_equal(s_p[key], s_x[key], err_msg=key)   # same routing
    else:
      np.testing.assert_allclose(s_p[key], s_x[key], rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(v_p, v_x, rtol=1e-6)
  np.testing.assert_allclose(m_p['loss/image'], m_x['loss/image'], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               g_p, g_x)


def test_dense_mixture_of_depths_step_follows_the_switch():
  """A dense FFN under mixture-of-depths: the depth router's selection, gather and
  combine are the only routing ops, and 'pallas' equals 'xla' on them too."""
  results = {}
  for kernels in ('xla', 'pallas'):
    config = tiny_config(ffn='dense', kernels=kernels, num_layers=2,
                         **{'mod.enabled': True, 'mod.modality_aware': True})
    results[kernels] = step_results(config)
  (v_x, _, g_x, s_x), (v_p, _, g_p, s_p) = results['xla'], results['pallas']
  np.testing.assert_array_equal(s_p['layer_0']['plan'][0].token_index,
                                s_x['layer_0']['plan'][0].token_index)
  np.testing.assert_allclose(v_p, v_x, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               g_p, g_x)


def _pallas_kernel_names(config) -> list[str]:
  """The Pallas kernels in the jaxpr of one training step's loss and gradients."""
  model = transformer.build(config)
  params, _ = transformer.init(model, jax.random.key(0))
  batch = transformer.dummy_batch(config)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: transformer.loss_fn(model, p, batch)[0]))(params)
  names = []

  def walk(jpr):
    for eqn in jpr.eqns:
      if eqn.primitive.name == 'pallas_call':
        names.append(str(eqn.params['name']))
        continue
      for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(item, 'jaxpr', None)
          if inner is not None:
            walk(getattr(inner, 'jaxpr', inner))
  walk(jaxpr.jaxpr)
  return names


def test_mixture_of_depths_picks_gathers_and_combines_through_the_switch():
  """With a dense FFN, every Pallas kernel of a step is mixture-of-depths' own: its
  selection, its gather of the picked rows and its combine (forward and backward)."""
  config = tiny_config(ffn='dense', kernels='pallas', num_layers=2,
                       **{'mod.enabled': True})
  names = _pallas_kernel_names(config)
  assert any('select' in n or 'choice' in n for n in names), names
  assert any('gather' in n for n in names), names
  assert any('combine' in n for n in names), names
  config.model.kernels = 'xla'
  assert _pallas_kernel_names(config) == []


def test_kernel_choice_is_resolved_per_platform(monkeypatch):
  import jax.numpy as jnp
  from moma_jax.model import kernels
  import pallas_kernels as pk
  from pallas_kernels import library_matmul
  assert kernels.resolve('xla', 'gpu') is kernels.XLA
  assert kernels.resolve('auto', 'cpu') is kernels.XLA
  # On GPU a grouped matmul for the ragged SwiGLU (never ragged_dot), XLA for the rest.
  gpu = kernels.resolve('auto', 'gpu')
  assert gpu is kernels.AUTO_GPU and gpu.swiglu_ragged is not kernels.XLA.swiglu_ragged
  for op in ('select', 'gather', 'swiglu_blocks', 'combine'):
    assert getattr(gpu, op) is getattr(kernels.XLA, op), op
  assert kernels.resolve('pallas', 'gpu') is kernels.PALLAS
  assert kernels.resolve('pallas', 'cpu') is kernels.PALLAS
  tpu = kernels.resolve('auto', 'tpu')
  assert tpu is kernels.resolve('pallas', 'tpu') and tpu.pallas
  # On TPU: megablox for the ragged matmul, the references for what has no Mosaic path.
  called = []
  monkeypatch.setattr(library_matmul, 'swiglu_megablox',
                      lambda rows, *args, **kwargs: called.append(rows.shape) or rows)
  rows, sizes = jnp.ones((4, 8)), jnp.array([3, 1], jnp.int32)
  w_in, w_out = jnp.ones((2, 8, 16)), jnp.ones((2, 16, 8))
  tpu.swiglu_ragged(rows, sizes, w_in, w_in, w_out)
  assert called == [(4, 8)]                   # the TPU's ragged SwiGLU is megablox's
  kernels.XLA.swiglu_ragged(rows, sizes, w_in, w_in, w_out)
  assert called == [(4, 8)]                   # and the reference path is not
  for op in ('select', 'gather', 'swiglu_blocks', 'combine'):
    assert getattr(tpu, op) is getattr(kernels.XLA, op), op
  with pk.target_backend('tpu'):
    assert kernels.resolve('pallas') is tpu
  with pytest.raises(ValueError, match='model.kernels'):
    kernels.resolve('triton', 'gpu')
