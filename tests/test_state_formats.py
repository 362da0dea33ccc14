"""The layouts the training step takes its state in (moma_jax/runs/state.py): the expert
weights and their Adam moments row-major, everything else as its sharding and the
platform leave it. On a TPU that removes the step's relayout copies
(tests/test_compile.py compiles one); here, on a CPU, whose default is row-major, the
tests check which arrays get a format and that `place` moves exactly the arrays laid
out otherwise.
"""
import jax
import numpy as np
from jax.experimental.layout import Format
from jax.experimental.layout import Layout

from conftest import tiny_config
from moma_jax.model import param_names
from moma_jax.model import sharding
from moma_jax.model import transformer
from moma_jax.runs import state as train_state
from moma_jax.training import optimizer as optimizer_lib

ROW_MAJOR = (0, 1, 2)


def _state_formats():
  config = tiny_config(num_layers=2)
  model, tx = transformer.build(config), optimizer_lib.optimizer(config)
  abstract, shardings = train_state.layout(model, tx, sharding.one_device_mesh())
  return model, tx, abstract, shardings, train_state.formats(abstract)


def test_only_the_expert_weights_and_their_moments_get_a_row_major_format():
  _, _, abstract, shardings, formats = _state_formats()
  flat = jax.tree_util.tree_flatten_with_path(formats)[0]
  laid_out = [jax.tree_util.keystr(path) for path, f in flat if isinstance(f, Format)]
  # wi_0, wi_1, wo in each of 2 layers, each as a parameter, Adam's mu and its nu.
  assert len(laid_out) == 3 * 2 * 3, laid_out
  for path, f in flat:
    if isinstance(f, Format):
      assert param_names.role(path) == 'expert', jax.tree_util.keystr(path)
      assert f.layout.major_to_minor == ROW_MAJOR
  # Every leaf keeps the sharding the rules gave it; only the layout is added.
  plain = jax.tree.leaves(shardings)
  assert [f.sharding if isinstance(f, Format) else f for _, f in flat] == plain
  assert len(plain) == len(jax.tree.leaves(abstract))


def test_place_moves_only_the_arrays_laid_out_otherwise():
  model, tx, _, _, formats = _state_formats()
  state = train_state.create(model, tx, formats, seed=0)
  wi_0 = state['params']['layer_1']['experts']['wi_0']
  expected = np.asarray(wi_0)
  # As a restore on a TPU would hand it over: the expert weight in another layout.
  column_major = jax.device_put(wi_0, Format(Layout((2, 1, 0)), wi_0.sharding))
  state['params']['layer_1']['experts']['wi_0'] = column_major
  before = jax.tree.leaves(state)

  placed = train_state.place(state, formats)

  moved = placed['params']['layer_1']['experts']['wi_0']
  assert moved.format.layout.major_to_minor == ROW_MAJOR
  np.testing.assert_array_equal(np.asarray(moved), expected)
  assert column_major.is_deleted()          # donated: one copy on the devices, not two
  kept = [a is b for a, b in zip(jax.tree.leaves(placed), before)]
  assert kept.count(False) == 1, kept
