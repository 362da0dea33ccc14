"""The attention backends (moma_jax/model/attention_kernels.py) against the XLA attention.

Splash (TPU) and flash (GPU) run in Pallas interpret mode here: values and gradients
equal the materialized-softmax attention at every query that has a segment (padding
queries attend to nothing and are never read), with several documents per row and
lengths that are not a multiple of any block. A mixture-of-depths model, whose attention
runs among the picked tokens, gives the same loss and gradients with splash. Splash
lowers for TPU and flash for CUDA on this machine (cuDNN's lowering needs cuDNN
itself: its check is the GPU-only test at the end). Sharded attention on
8 fake devices: tests/multidevice.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pallas_kernels
import pytest

from conftest import tiny_config
from moma_jax.model import attention_kernels
from moma_jax.model import kernels
from moma_jax.model import transformer

B, T, H, K = 2, 40, 2, 16


def inputs(seed=0):
  """q, k, v [B, T, H, K]; row 0: three documents; row 1: one, then padding."""
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32) for _ in range(3))
  seg = np.ones((B, T), np.int32)
  seg[0, 11:30], seg[0, 30:] = 2, 3
  seg[1, 33:] = 0
  return q, k, v, jnp.asarray(seg)


@pytest.mark.parametrize('backend', ['splash', 'flash', 'tokamax'])
def test_backend_equals_xla_attention(backend, monkeypatch):
  if backend == 'tokamax':
    # Its GPU kernels trace only on a GPU: here its XLA one checks the call around them
    # (the document mask, causality, the argument layout).
    monkeypatch.setattr(attention_kernels, 'TOKAMAX_GPU', ('xla',))
  q, k, v, seg = inputs()
  valid = np.asarray(seg > 0)
  cot = jax.random.normal(jax.random.key(1), q.shape) * valid[..., None, None]

  def run(q, k, v, name):
    out, pullback = jax.vjp(lambda *a: attention_kernels.attend(*a, seg, name), q, k, v)
    return out, pullback(cot)
  run = jax.jit(run, static_argnames='name')
  out, grads = run(q, k, v, name=backend)
  ref, ref_grads = run(q, k, v, name='xla')
  np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid],
                             rtol=2e-5, atol=2e-5)
  for name, a, b in zip('qkv', grads, ref_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f'd{name}')
  # A key of another document never changes a query's output.
  v2 = v.at[0, 35].add(100.0)                              # document 3 of row 0
  moved, _ = run(q, k, v2, name=backend)                     # the same program
  np.testing.assert_array_equal(moved[0, :30], out[0, :30])


def test_mixture_of_depths_model_with_splash_equals_xla():
  """Attention among picked tokens (their original positions, one segment per
  document of each sequence): same loss and gradients."""
  results = {}
  for attention in ('xla', 'splash'):
    config = tiny_config(ffn='moma', experts=(2, 2), attention=attention,
                         **{'mod.enabled': True})      # one layer: a MoD one
    model = transformer.build(config)
    params, _ = transformer.init(model, jax.random.key(0))
    batch = transformer.dummy_batch(config)
    rng = np.random.default_rng(0)
    batch['tokens'] = jnp.asarray(rng.integers(0, 64, batch['tokens'].shape), jnp.int32)
    batch['modality'] = jnp.asarray(rng.random(batch['tokens'].shape) < 0.5, jnp.int8)
    seg = np.ones(batch['tokens'].shape, np.int32)
    seg[0, 5:], seg[1, -3:] = 2, 0
    batch['segment_ids'] = batch['loss_mask'] = jnp.asarray(seg)
    results[attention] = jax.jit(jax.value_and_grad(
        lambda p: transformer.loss_fn(model, p, batch)[0]))(params)
  (v_x, g_x), (v_s, g_s) = results['xla'], results['splash']
  np.testing.assert_allclose(v_s, v_x, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), g_s, g_x)


def test_auto_is_splash_on_tpu_flash_on_gpu_xla_on_cpu():
  assert [kernels.resolve_attention('auto', p) for p in ('cpu', 'gpu', 'tpu')] == [
      'xla', 'flash', 'splash']
  assert kernels.resolve_attention('cudnn', 'tpu') == 'cudnn'
  with pallas_kernels.target_backend('tpu'):
    assert kernels.resolve_attention('auto') == 'splash'
  with pytest.raises(ValueError, match='model.attention'):
    kernels.resolve_attention('flash2', 'gpu')


@pytest.mark.parametrize('platform, backend, marker', [
    ('tpu', 'splash', 'tpu_custom_call'), ('cuda', 'flash', '__gpu$xla.gpu.triton')])
def test_backend_lowers_for_its_platform(platform, backend, marker):
  """The training step's attention (forward and backward) as the platform's kernel, no
  [T, T] score tensor in the program."""
  t = 256
  q = jax.ShapeDtypeStruct((1, t, H, 64), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
  loss = lambda q, k, v, s: attention_kernels.attend(q, k, v, s, backend).astype(
      jnp.float32).sum()
  with pallas_kernels.target_backend(platform):
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, q, seg).lower(
        lowering_platforms=(platform,)).as_text()
  assert marker in text
  assert f'{t}x{t}x' not in text and f'x{t}x{t}x' not in text


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU')
@pytest.mark.parametrize('backend', ['flash', 'cudnn'])
def test_gpu_backends_compiled_equal_xla(backend):
  """On a GPU: the compiled Triton flash kernel and cuDNN against XLA (bf16)."""
  q, k, v, seg = inputs()
  t = 128
  pad = lambda a: jnp.pad(a, [(0, 0), (0, t - T)] + [(0, 0)] * (a.ndim - 2))
  q, k, v, seg = (pad(a) for a in (q, k, v, seg))
  q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
  valid = np.asarray(seg > 0)
  out = jax.jit(lambda *a: attention_kernels.attend(*a, backend))(q, k, v, seg)
  ref = jax.jit(lambda *a: attention_kernels.attend(*a, 'xla'))(q, k, v, seg)
  np.testing.assert_allclose(np.asarray(out, np.float32)[valid],
                             np.asarray(ref, np.float32)[valid], rtol=3e-2, atol=3e-2)


def test_splash_flops_count_the_causal_blocks():
  # 300 tokens: 3 blocks of 128, 6 causal blocks; 2 matmuls forward, 5 more backward.
  per_block = 2 * 128 * 128 * 16
  assert attention_kernels.splash_flops(2, 300, 4, 16, False) == 2 * 4 * 6 * 2 * per_block
  assert attention_kernels.splash_flops(1, 128, 1, 16, True) == 7 * per_block
