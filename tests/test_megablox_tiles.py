"""The TPU grouped matmul's tile rule (pallas_kernels/megablox_tiles.py), as arithmetic.

The VMEM facts it encodes were found with libtpu's compiler (a gmm and its gradient at
8192 x 1024 x 2730): on v5p (1024, 512, 1024) compiles and (1024, 1024, 1024) fails with
CompileTimeScopedVmemOom; on v6e (1024, 1024, 1024) compiles and (2048, 1024, 1024)
fails. Equality of megablox under these tiles with the reference is in
tests/test_pallas_kernels.py.
"""
import math

import pytest

from moma_jax import configs
from pallas_kernels import megablox_tiles as mt

V5P, V6E = 'TPU v5', 'TPU v6 lite'


def test_the_budget_admits_what_compiles_and_refuses_what_does_not():
  assert mt.vmem_bytes(1024, 512, 1024) <= mt.budget(V5P) < mt.vmem_bytes(1024, 1024, 1024)
  assert mt.vmem_bytes(1024, 1024, 1024) <= mt.budget(V6E) < mt.vmem_bytes(2048, 1024, 1024)


@pytest.mark.parametrize('rows', [16, 100, 1000, 4096, 8320, 12345, 33280, 99991])
def test_row_tile_pads_at_most_one_percent(rows):
  tm = mt.row_tile(rows)
  assert tm % 16 == 0 and 16 <= tm <= mt.MAX_ROW_TILE
  padded = math.ceil(rows / tm) * tm
  assert padded - rows <= max(0.01 * rows, 15)
  # No larger row tile pads as little.
  assert all(math.ceil(rows / t) * t - rows > 0.01 * rows
             for t in range(tm + 16, min(mt.MAX_ROW_TILE, rows) + 1, 16))


@pytest.mark.parametrize('device_kind', [V5P, V6E, None])
@pytest.mark.parametrize('m, k, n', [(8352, 1024, 5460), (8352, 2730, 1024),
                                     (8352, 512, 2730), (928, 64, 40)])
def test_chosen_tiles_fit_and_move_the_fewest_bytes(device_kind, m, k, n):
  tm = 928
  tiles = mt.choose(m, k, n, tm, device_kind, experts=2)
  assert tiles[0] == tm and mt.vmem_bytes(*tiles) <= mt.budget(device_kind)
  best = mt.traffic(m, k, n, 2, *tiles)
  for tk in (128, 256, 512, 1024, 2048):
    for tn in (128, 256, 512, 1024, 2048):
      if k >= 128 and n >= 128 and mt.vmem_bytes(tm, tk, tn) <= mt.budget(device_kind):
        assert mt.traffic(m, k, n, 2, tm, tk, tn) >= best
  if k < 128 and n < 128:                       # a block as wide as a narrow array
    assert tiles[1:] == (k, n)


def test_bigger_tiles_move_fewer_bytes_than_128_cubes():
  """At the 435M moma_4t4i expert shapes the rule moves under half the bytes of
  (128, 128, 128), the tiles this project used before."""
  m, k, n = 16704, 1024, 5460
  tm = mt.row_tile(m)
  chosen = mt.choose(m, k, n, tm, V5P, experts=2)
  assert mt.traffic(m, k, n, 2, *chosen) < 0.5 * mt.traffic(m, k, n, 2, 128, 128, 128)


@pytest.mark.parametrize('text, tiles', [('auto', None), ('512x512x1024', (512, 512, 1024)),
                                         ('48x128x256', (48, 128, 256))])
def test_matmul_tiles_config(text, tiles):
  c = configs.default_config()
  c.model.matmul_tiles = text
  assert configs.matmul_tiles(configs.validate(c).model) == tiles


@pytest.mark.parametrize('text', ['512x512', '500x512x1024', '512x100x1024', '0x128x128', 'big'])
def test_bad_matmul_tiles_name_the_field(text):
  c = configs.default_config()
  c.model.matmul_tiles = text
  with pytest.raises(configs.ConfigError, match='^model.matmul_tiles: '):
    configs.validate(c)
