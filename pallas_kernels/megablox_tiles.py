"""Tiles for megablox's grouped matmuls, chosen for the shapes and the chip.

A megablox call (`gmm`: lhs [M, K] times one expert's [K, N] per row group, and its
weight gradient `tgmm`) runs a grid of (tm, tk, tn) tiles, and its HBM traffic is that
of the grid (its own cost estimate says so):
  gmm   M*K * ceil(N/tn)  (the rows, once per column tile)
        + K*N * (M/tm + E - 1)  (an expert's weight, once per row tile it meets)
        + M*N  (the output)
  tgmm  M*K * ceil(N/tn) + M*N * ceil(K/tk) + E*K*N.
A 128 x 128 x 128 tile does 64 FLOPs per byte it loads, far under a TPU's ridge (v5p:
about 166), so bigger tiles move fewer bytes, up to what VMEM holds: double-buffered
input and output blocks plus a float32 accumulator must fit the compiler's scoped VMEM
(16 MiB on v4 and v5, 32 MiB on v6e; a compile beyond it fails with
`CompileTimeScopedVmemOom`, checked with libtpu for v5p, v5e and v6e), with a quarter
left for the compiler's own scratch.

`row_tile(rows)` is the row tile: the rows are padded to a multiple of it once, so it is
the largest tile (<= MAX_ROW_TILE, a multiple of 16 for bf16's packed sublanes) that
pads the rows by at most 1% (padding rows count in the kernel's FLOP estimate).
`tiling(tm, device_kind)` is megablox's `LutFn`: for each call's (M, K, N), the
(tk, tn) that moves the fewest bytes (both formulas above) within the VMEM budget;
megablox calls it for the forward matmul and both backward ones, each with its own
shape. `fixed(tm, tk, tn)` is the LutFn of given tiles, for trying others
(`model.matmul_tiles`).

Axis legend: M rows, K contraction, N output columns, E experts.
"""
from __future__ import annotations

import math
from typing import Callable

MIB = 2**20
SCOPED_VMEM = {'TPU v6 lite': 32 * MIB}     # device_kind -> bytes; others below
DEFAULT_SCOPED_VMEM = 16 * MIB
VMEM_FRACTION = 0.75
MAX_ROW_TILE = 1024
ROW_PADDING = 0.01
_COLUMN_TILES = (128, 256, 512, 1024, 2048)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def vmem_bytes(tm: int, tk: int, tn: int, itemsize: int = 2) -> int:
  """VMEM one call holds: its blocks double-buffered, the float32 accumulator; the
  larger of gmm's (lhs tm x tk, rhs tk x tn, out tm x tn) and tgmm's (lhs tm x tk,
  rhs tm x tn, out tk x tn)."""
  gmm = 2 * (tm * tk + tk * tn + tm * tn) * itemsize + 4 * tm * tn
  tgmm = 2 * (tm * tk + tm * tn + tk * tn) * itemsize + 4 * tk * tn
  return max(gmm, tgmm)


def budget(device_kind: str | None) -> int:
  """Bytes of VMEM a tile choice may use on this chip (module docstring)."""
  return int(VMEM_FRACTION * SCOPED_VMEM.get(device_kind or '', DEFAULT_SCOPED_VMEM))


def row_tile(rows: int) -> int:
  """The row tile for `rows` rows (module docstring): at least 16, the rows themselves
  (rounded up to 16) when they fit one tile."""
  whole = _round_up(max(rows, 1), 16)
  if whole <= MAX_ROW_TILE:
    return whole
  for tm in range(MAX_ROW_TILE, 127, -16):
    if _round_up(rows, tm) - rows <= ROW_PADDING * rows:
      return tm
  return 128


def traffic(m: int, k: int, n: int, experts: int, tm: int, tk: int, tn: int) -> int:
  """Elements a gmm and a tgmm of this shape move together (module docstring)."""
  gmm = m * k * math.ceil(n / tn) + k * n * (math.ceil(m / tm) + experts - 1) + m * n
  tgmm = m * k * math.ceil(n / tn) + m * n * math.ceil(k / tk) + experts * k * n
  return gmm + tgmm


def choose(m: int, k: int, n: int, tm: int, device_kind: str | None, experts: int = 1,
           itemsize: int = 2) -> tuple[int, int, int]:
  """(tm, tk, tn) for one call: the fewest bytes within the VMEM budget, larger tiles
  first on a tie."""
  limit = budget(device_kind)
  best = None
  for tk in _candidates(k):
    for tn in _candidates(n):
      if vmem_bytes(tm, tk, tn, itemsize) > limit:
        continue
      key = (traffic(m, k, n, experts, tm, tk, tn), -tk * tn)
      if best is None or key < best[0]:
        best = (key, (tm, tk, tn))
  if best is None:
    raise ValueError(f'no megablox tiling of row tile {tm} fits {limit} bytes of VMEM')
  return best[1]


def _candidates(size: int) -> list[int]:
  """Column tiles for an axis: the axis itself when under 128 (a block as wide as the
  array), else the powers of two from 128 under it (rounded up to 128) and that rounded
  width when no wider than the largest (megablox masks a last, partial tile)."""
  if size < 128:
    return [size]
  whole = _round_up(size, 128)
  return [t for t in _COLUMN_TILES if t < whole] + (
      [whole] if whole <= _COLUMN_TILES[-1] else [])


def tiling(tm: int, device_kind: str | None, experts: int = 1,
           itemsize: int = 2) -> Callable[[int, int, int], tuple[int, int, int]]:
  """megablox's LutFn for rows padded to a multiple of `tm` (module docstring)."""
  return lambda m, k, n: choose(m, k, n, tm, device_kind, experts, itemsize)


def fixed(tm: int, tk: int, tn: int) -> Callable[[int, int, int], tuple[int, int, int]]:
  """megablox's LutFn for given tiles (`model.matmul_tiles`), each column tile no wider
  than its axis under 128."""
  return lambda m, k, n: (tm, tk if k >= 128 else k, tn if n >= 128 else n)
