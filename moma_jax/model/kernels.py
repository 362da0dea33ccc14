"""The routing operations behind `model.kernels`, resolved in one place per platform.

Every sparse path (expert groups, token choice, expert parallelism, mixture-of-depths)
runs the same five operations, through the routing plan (moma_jax/model/routing.py):
  select(scores [G, N, E], eligible [G, N, E|1], K) -> idx, gate [G, E, K]
  gather(x [T, D], token_index [R], S) -> rows [R, D]         (index T: a zero row)
  swiglu_blocks(rows [E, C, D], wi_0, wi_1 [E, D, F], wo [E, F, D]) -> [E, C, D]
  swiglu_ragged(rows [R, D], rows_per_expert [E], wi_0, wi_1, wo) -> [R, D]
  combine(out [R, D], weight [R], token_index [R], T, S) -> y [T, D]
(S: the most rows one token occupies, which the Pallas combine's inverse map needs.)

`resolve(model.kernels)` picks them when the model is traced, for the platform it is
traced for (`pallas_kernels.target_backend` sets another one for ahead-of-time
compiles):

  model.kernels   cpu                      gpu                 tpu
  'xla'           references (ragged:      references          references
                  blocks and tiles)
  'pallas'        our kernels, interpret   our kernels         megablox ragged matmul,
                  mode (slow: for tests)   (Triton)            references for the rest
  'auto'          = 'xla'                  grouped matmul      = 'pallas'
                                           (below), references
                                           for the rest

'auto' (the default) takes what has been measured or is known to pay. On TPU megablox,
whose cost estimate puts a moma_4t4i training step at 1.01x the dense step's compiled
FLOPs (XLA's own ragged_dot: 1.14x, README "Will it fit?"), with tiles chosen for the
shapes and the chip (pallas_kernels/megablox_tiles.py) unless `model.matmul_tiles`
names them. On GPU never XLA's
`ragged_dot`, whose GPU lowering pads every expert's rows to the whole row count (a
masked dense matmul: E times the expert FLOPs): the ragged SwiGLU runs on a grouped
matmul that computes only each expert's rows, `gpu_grouped_matmul()`:
  'tokamax'  tokamax's `ragged_dot` GPU kernels (Mosaic GPU, Triton; the `cuda12` extra
             installs tokamax), when tokamax imports and a GPU is present: its kernels
             refuse to trace anywhere else;
  'triton'   this project's Triton kernel (pallas_kernels.swiglu_ragged), otherwise, so
             also for a lowering on a host without a GPU (`moma-compile --platform cuda`).
Selection, gathers and combines stay XLA's gathers and scatters there, which touch each
row once.

The references are `pallas_kernels.references`, the functions each kernel is tested
to equal (tests/test_pallas_kernels.py), except the ragged SwiGLU on CPU, whose
`jax.lax.ragged_dot` runs every expert over every row there: a batched block per expert
plus its overflow tiles computes the same (moma_jax/model/tiled_swiglu.py). On TPU our
selection, gather and combine kernels have no Mosaic lowering we have tested, so
'pallas' there means megablox where it fits and XLA elsewhere.

`resolve_attention(model.attention)` does the same for attention
(moma_jax/model/attention_kernels.py):

  model.attention  cpu      gpu                              tpu
  'auto'           xla      tokamax, else cudnn; lowered     splash (Pallas, Mosaic)
                            without a GPU: flash
  any other        that backend, wherever it is asked for (Pallas ones interpret on CPU)

On GPU 'auto' leaves JAX's Pallas GPU attention module (deprecated from jax 0.11 in
favour of tokamax) for tokamax's attention where tokamax is installed, else cuDNN's;
both take the documents as a [B, 1, T, T] mask. Neither traces without a GPU, so a
lowering for CUDA on a host without one (`moma-compile --platform cuda`) still takes the
Pallas flash kernel, whose segment ids need no mask.

Axis legend: G routing groups, N tokens per group, E experts, K candidate slots, T
tokens, R rows, C rows per expert, D embed, F hidden, S rows per token.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import pallas_kernels
from pallas_kernels import references

from moma_jax import configs
from moma_jax.model import tiled_swiglu



@dataclasses.dataclass(frozen=True)
class Ops:
  """The five routing operations (see the module docstring); `pallas`: whether any of
  them is a Pallas kernel (their outputs carry no shard_map varying-axes annotation)."""
  name: str
  select: Callable
  gather: Callable
  swiglu_blocks: Callable
  swiglu_ragged: Callable
  combine: Callable
  pallas: bool


def _swiglu_ragged_xla(rows, rows_per_expert, wi_0, wi_1, wo):
  """The ragged SwiGLU reference, as blocks and tiles on CPU; `ragged_dot` for any other
  platform a program is traced for (`pallas_kernels.target_backend`). Chosen in Python,
  not by `jax.lax.platform_dependent`: its conditional would hold the layer's collectives
  under a mesh, and XLA's CPU runtime (jaxlib >= 0.11) runs a conditional side by side
  with the program's other collectives, in different orders on different devices, which
  deadlocks (fsdp=2 x expert=2 x tensor=2 on 8 CPU devices)."""
  if pallas_kernels.backend() in ('gpu', 'tpu'):
    return references.swiglu_ragged_reference(rows, rows_per_expert, wi_0, wi_1, wo)
  return tiled_swiglu.swiglu_tiled(rows, rows_per_expert, wi_0, wi_1, wo)


XLA = Ops(
    name='xla',
    select=references.expert_choice_reference,
    gather=lambda x, token_index, rows_per_token: references.gather_rows_reference(
        x, token_index),
    swiglu_blocks=references.swiglu_capacity_reference,
    swiglu_ragged=_swiglu_ragged_xla,
    combine=lambda out, weight, token_index, t, rows_per_token:
        references.combine_rows_reference(out, weight, token_index, t),
    pallas=False)

PALLAS = Ops(
    name='pallas',
    select=pallas_kernels.expert_choice,
    gather=lambda x, token_index, rows_per_token: pallas_kernels.gather_rows(
        x, token_index, rows_per_token=rows_per_token),
    swiglu_blocks=pallas_kernels.swiglu_capacity,
    swiglu_ragged=pallas_kernels.swiglu_ragged,
    combine=pallas_kernels.combine_rows,
    pallas=True)

PALLAS_TPU = dataclasses.replace(
    XLA, name='pallas_tpu', pallas=True,
    swiglu_ragged=functools.partial(pallas_kernels.swiglu_ragged, impl='megablox'))


def gpu_grouped_matmul() -> str:
  """The grouped matmul `auto` takes on GPU (see the module docstring): 'tokamax' or
  'triton'."""
  return 'tokamax' if _tokamax_on_gpu() else 'triton'


def _swiglu_ragged_gpu(rows, rows_per_expert, wi_0, wi_1, wo):
  """The ragged SwiGLU on `gpu_grouped_matmul()`, chosen when the model is traced."""
  impl = 'tokamax' if gpu_grouped_matmul() == 'tokamax' else 'pallas'
  return pallas_kernels.swiglu_ragged(rows, rows_per_expert, wi_0, wi_1, wo, impl=impl)


AUTO_GPU = dataclasses.replace(XLA, name='auto_gpu', pallas=True,
                               swiglu_ragged=_swiglu_ragged_gpu)


def resolve(kernels: str, platform: str | None = None,
            matmul_tiles: tuple[int, int, int] | None = None) -> Ops:
  """The ops of `model.kernels` on `platform` ('cpu', 'gpu', 'tpu'; None: the one being
  traced for). matmul_tiles: megablox's (TM, TK, TN) on TPU (`configs.matmul_tiles`);
  None: chosen for the shapes."""
  if kernels not in configs.KERNELS:
    raise ValueError(f'model.kernels must be one of {configs.KERNELS}, got {kernels!r}')
  platform = platform or pallas_kernels.backend()
  if kernels == 'auto':
    if platform == 'gpu':
      return AUTO_GPU
    kernels = 'pallas' if platform == 'tpu' else 'xla'
  if kernels == 'xla':
    return XLA
  if platform != 'tpu':
    return PALLAS
  if matmul_tiles is None:
    return PALLAS_TPU
  return dataclasses.replace(PALLAS_TPU, swiglu_ragged=functools.partial(
      pallas_kernels.swiglu_ragged, impl='megablox', tiles=matmul_tiles))


def resolve_attention(attention: str, platform: str | None = None) -> str:
  """The attention backend of `model.attention` on `platform` (None: the one being
  traced for): 'xla', 'splash', 'flash', 'cudnn' or 'tokamax'."""
  if attention not in configs.ATTENTION:
    raise ValueError(f'model.attention must be one of {configs.ATTENTION}, got {attention!r}')
  if attention != 'auto':
    return attention
  platform = platform or pallas_kernels.backend()
  if platform == 'gpu':
    return gpu_attention()
  return 'splash' if platform == 'tpu' else 'xla'


def _tokamax_installed() -> bool:
  try:
    import tokamax  # pylint: disable=g-import-not-at-top,unused-import  # optional
  except ImportError:
    return False
  return True


def _tokamax_on_gpu() -> bool:
  """tokamax imports and a GPU is present (its GPU kernels trace nowhere else)."""
  return jax.default_backend() == 'gpu' and _tokamax_installed()


def gpu_attention() -> str:
  """The attention `auto` takes on GPU (see the module docstring)."""
  if jax.default_backend() != 'gpu':
    return 'flash'
  return 'tokamax' if _tokamax_installed() else 'cudnn'
