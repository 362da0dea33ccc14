"""The trainer holds one training state on the devices (8 CPU devices, fsdp=8).

A resumed run restores into an abstract state (it never initializes one beside it) and
donates the state to every step, so while it trains the live device arrays are one
state, the prefetched batches and a few small metrics.
"""
import gc
import math
import signal

import jax
import pytest

from moma_jax import configs
from moma_jax.model import sharding
from moma_jax.model import transformer
from moma_jax.training import optimizer as optimizer_lib
from moma_jax.runs import state as train_state
from moma_jax.training import trainer as train

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason='needs 8 devices')


def _device_bytes(arrays) -> int:
  """Bytes of the distinct device buffers behind `arrays` (a replicated array counts
  once per device that holds it; views of one buffer, such as the per-shard arrays a
  checkpoint save makes, count once)."""
  buffers = {}
  for a in arrays:
    if a.is_deleted():
      continue
    for s in a.addressable_shards:
      buffers[s.device.id, s.data.unsafe_buffer_pointer()] = s.data.nbytes
  return sum(buffers.values())


def test_a_resumed_run_holds_one_state_and_its_prefetched_batches(data_setup, tmp_path):
  from conftest import tiny_train_config
  config = tiny_train_config(data_setup[0].data.data_dir, steps=6, ckpt_every=3,
                             eval_every=100, eval_max_batches=1, log_every=1)
  config.routing.group_size = 1
  config.mesh.update(dict(data=1, fsdp=8, expert=1, tensor=1))
  config = configs.validate(config)
  workdir = str(tmp_path / 'run')

  def stop_at_3(step):
    if step == 3:
      signal.raise_signal(signal.SIGTERM)
  assert train.train(config, workdir, on_step=stop_at_3)['step'] == 3

  gc.collect()
  before = _device_bytes(jax.live_arrays())
  seen = {}

  def measure(step):
    seen[step] = _device_bytes(jax.live_arrays()) - before

  assert train.train(config, workdir, on_step=measure)['step'] == 6   # resumed at 3

  # One state as the trainer lays it out: each leaf's shard on each device holding it.
  abstract, _ = train_state.layout(transformer.build(config),
                                   optimizer_lib.optimizer(config), sharding.make_mesh(config))
  state = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
              * len(a.sharding.device_set) for a in jax.tree.leaves(abstract))
  b, l = config.train.batch_size, config.data.seq_len
  batch = 5 * b * l * 4                  # five [B, L] arrays of 4 bytes or fewer, split
  bound = 1.1 * state + (config.train.prefetch + 2) * batch
  assert sorted(seen) == [4, 5, 6]
  assert all(v <= bound for v in seen.values()), (seen, state, bound)
  # Not vacuous: what lives is at least the state itself.
  assert all(v >= state for v in seen.values()), (seen, state)

