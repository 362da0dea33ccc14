"""Splash and flash attention under a mesh (shard_map over batch and heads) equal the
unsharded XLA attention, values and gradients (8 CPU devices, interpret mode)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moma_jax.model import attention_kernels

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason='needs 8 devices')


@pytest.mark.parametrize('backend', ['splash', 'flash'])
def test_sharded_attention_equals_one_device(backend):
  b, t, h, k = 4, 24, 2, 16
  rng = np.random.default_rng(0)
  q, kk, v = (jnp.asarray(rng.normal(size=(b, t, h, k)), jnp.float32) for _ in range(3))
  seg = np.ones((b, t), np.int32)
  seg[1, 9:] = 2
  seg[3, 20:] = 0
  seg = jnp.asarray(seg)
  valid = np.asarray(seg > 0)
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * valid[..., None, None]

  def loss(q, kk, v, name):
    return jnp.sum(attention_kernels.attend(q, kk, v, seg, name) * cot)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  ref_value, ref_grads = grad(q, kk, v, 'xla')
  mesh = jax.make_mesh((2, 1, 2, 2), ('data', 'fsdp', 'expert', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)   # as the model's
  with jax.set_mesh(mesh):
    spec = NamedSharding(mesh, P(('data', 'fsdp', 'expert'), None, 'tensor', None))
    placed = [jax.device_put(a, spec) for a in (q, kk, v)]
    value, grads = grad(*placed, backend)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for a, r in zip(grads, ref_grads):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)
