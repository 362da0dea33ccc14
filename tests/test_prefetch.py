"""The trainer's device-feeding parts: batches made ahead (prefetch.Prefetcher) and the
donated training step, whose checkpoint must hold the state it was given."""
import itertools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from test_model import random_batch
from moma_jax.data import pipeline
from moma_jax.model import transformer
from moma_jax.runs import checkpoint as ckpt_lib
from moma_jax.training import optimizer as optimizer_lib
from moma_jax.training import prefetch
from moma_jax.training.step import make_train_step


def _iterator(data_setup):
  config, tok = data_setup
  return pipeline.train_iterator(config, tok, 0, 1)


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('depth', [0, 1, 3])
def test_prefetched_batches_and_positions_equal_reading_in_turn(data_setup, depth):
  """Whatever the producer has made ahead, the k-th batch is the k-th of the stream and
  its position resumes a fresh iterator exactly after it."""
  direct = _iterator(data_setup)
  want = list(itertools.islice(direct, 6))
  with prefetch.Prefetcher(_iterator(data_setup), lambda b: b, depth) as batches:
    got = [next(batches) for _ in range(4)]
  for k, (batch, _) in enumerate(got):
    assert _same(batch, want[k]), k
  resumed = _iterator(data_setup)
  resumed.set_state(got[2][1])               # after batch 2 (the producer was past it)
  assert _same(next(resumed), want[3]) and _same(next(resumed), want[4])


class _Failing:
  """Yields ints, then raises at item `at` (a stand-in for unreadable data)."""

  def __init__(self, at):
    self.i, self.at = 0, at

  def __next__(self):
    if self.i == self.at:
      raise ValueError(f'cannot read example {self.i}')
    self.i += 1
    return self.i

  def get_state(self):
    return {'i': self.i}


@pytest.mark.parametrize('depth', [0, 2])
def test_a_producer_error_is_raised_by_next_as_itself(depth):
  with prefetch.Prefetcher(_Failing(at=3), lambda b: b, depth) as batches:
    assert [next(batches) for _ in range(3)] == [(1, {'i': 1}), (2, {'i': 2}), (3, {'i': 3})]
    with pytest.raises(ValueError, match='cannot read example 3'):
      next(batches)


def test_leaving_stops_a_producer_blocked_on_a_full_queue():
  endless = itertools.count()

  class Counting:
    def __next__(self):
      return next(endless)

    def get_state(self):
      return {}
  before = threading.active_count()
  with prefetch.Prefetcher(Counting(), lambda b: b, 2) as batches:
    assert next(batches)[0] == 0
    assert threading.active_count() == before + 1
  assert threading.active_count() == before
  assert next(endless) <= 5                  # it made at most depth + 2 ahead, then waited


def test_the_state_is_donated_and_a_checkpoint_started_before_the_next_step_holds_it(
    tmp_path):
  """Each step reuses its input state's buffers; `Checkpoints.save` copies the arrays
  to the host before it returns, so the steps right after it leave the saved step equal
  to the state it was given. (On a CPU the host copy may alias a buffer: JAX then copies
  instead of donating it, until the save has finished.)"""
  config = tiny_config()
  model, tx = transformer.build(config), optimizer_lib.optimizer(config)
  params, _ = transformer.init(model, jax.random.key(0))
  step = make_train_step(model, tx, config)
  batch = {k: jnp.asarray(v) for k, v in random_batch(config).items()}
  run = lambda state, i: step(state, batch, jnp.int32(i))
  given = {'params': params, 'opt': tx.init(params)}
  state, _ = run(given, 1)
  assert all(a.is_deleted() for a in jax.tree.leaves(given))   # donated: buffers reused
  want = jax.tree.map(np.array, state)                          # a host copy of step 1
  ckpts = ckpt_lib.Checkpoints(str(tmp_path))
  try:
    ckpts.save(1, state, {'step': 1}, {})
    for i in (2, 3):
      state, metrics = run(state, i)
    assert int(metrics['update_count']) == 2      # updates applied before step 3's
    ckpts.wait()
    given = state
    state, _ = run(given, 4)
    assert all(a.is_deleted() for a in jax.tree.leaves(given))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                         sharding=a.sharding), state)
    restored, _ = ckpts.restore(1, target)
  finally:
    ckpts.close()
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
