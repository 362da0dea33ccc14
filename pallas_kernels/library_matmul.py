"""The ragged SwiGLU on the TPU and GPU libraries' grouped matmuls.

`swiglu_ragged(impl='megablox' | 'tokamax')` (pallas_kernels/grouped_matmul.py) runs the
same function as our kernels and the `ragged_dot` reference: rows [R, D], group_sizes
[E] int32 (expert e's rows follow expert e-1's), wi_0, wi_1 [E, D, F], wo [E, F, D] ->
[R, D], zero past the groups. Neither library fuses the GLU into its matmul.

TPU, `jax.experimental.pallas.ops.tpu.megablox` `gmm`: the same ragged contract (lhs
[R, K], rhs [E, K, N], int32 group_sizes), Mosaic-tuned tiling, scalar-prefetched group
metadata (which Triton lacks, hence our own kernel on GPU) and its own custom_vjp with
the `tgmm` weight gradient. It needs R to be a multiple of its row tile (we pad) and
does not write rows past the last group (we mask them to zero, in and out, so values
and gradients match the reference). Its tiles are chosen for the shapes and the chip
(pallas_kernels/megablox_tiles.py), and the two gated projections run as one matmul.

GPU, `tokamax.ragged_dot`: tokamax's maintained grouped matmul (tuned for H100 and
B200), restricted to its GPU kernels (`TOKAMAX_GPU`), with tokamax's own VJP. They trace
only on a GPU, so a lowering on a host without one takes our Triton kernel
(moma_jax/model/kernels.py decides).

Axis legend: R rows, E experts, D embed, F SwiGLU hidden.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import megablox_tiles

# tokamax's GPU grouped matmuls, in its order of preference (Mosaic GPU on Hopper and
# newer, Triton elsewhere); never its 'xla' fallback, which is XLA's `ragged_dot`: on a
# GPU a masked dense matmul over every expert.
TOKAMAX_GPU = ('mosaic', 'triton')


def swiglu_megablox(rows, group_sizes, wi_0, wi_1, wo, interpret: bool,
                    tiles: tuple[int, int, int] | None = None):
  """The ragged SwiGLU as two megablox `gmm` calls (TPU; interpret mode elsewhere): the
  gated projections in one pass over [wi_0 | wi_1] ([E, D, 2F]: the rows are read once,
  and their gradient comes back from one transposed matmul), then the output one.
  tiles: (TM, TK, TN), or None for the ones pallas_kernels/megablox_tiles.py chooses
  for the shapes and the chip."""
  from jax.experimental.pallas.ops.tpu.megablox import gmm  # pylint: disable=g-import-not-at-top
  r = rows.shape[0]
  e = wi_0.shape[0]
  gs = group_sizes.astype(jnp.int32)
  if tiles is None:
    tm = megablox_tiles.row_tile(r)
    tiling = megablox_tiles.tiling(tm, _device_kind(), e, rows.dtype.itemsize)
  else:
    tm, tiling = tiles[0], megablox_tiles.fixed(*tiles)
  rp = _common.round_up(r, tm)
  # Rows past the last group are never written by gmm: zero them on the way in and out
  # so their values and gradients are the reference's zeros.
  used = (jnp.arange(rp) < jnp.sum(gs))[:, None]
  x = jnp.where(used, _common.pad_to(rows, 0, rp), 0)
  call = lambda lhs, rhs: gmm(lhs, rhs, gs, rows.dtype, tiling, interpret=interpret)
  gated = call(x, jnp.concatenate([wi_0, wi_1], axis=-1))                # [Rp, 2F]
  h = _common.glu_halves(gated, rows.dtype)
  out = jnp.where(used, call(h, wo), 0)
  return out[:r]


def _device_kind() -> str | None:
  """The kind of chip the program is traced for (the mesh's, else this machine's)."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, 'abstract_device', None)
  return device.device_kind if device is not None else jax.devices()[0].device_kind


def swiglu_tokamax(rows, group_sizes, wi_0, wi_1, wo, implementation=TOKAMAX_GPU):
  """The ragged SwiGLU as three tokamax `ragged_dot` calls; `implementation` names
  tokamax's kernels (the tests pass its 'xla' one, which traces anywhere)."""
  dot = functools.partial(_common.import_tokamax().ragged_dot,
                          group_sizes=group_sizes.astype(jnp.int32),
                          implementation=implementation)
  return dot(jax.nn.silu(dot(rows, wi_0)) * dot(rows, wi_1), wo)
