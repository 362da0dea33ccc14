"""Helpers shared by the kernels: backend choice, tile sizes, padding.

Every kernel here is written once and runs three ways:
  * CPU (tests, notebooks): `interpret=True`, the only way Pallas runs on a CPU;
  * GPU: compiled through the Triton lowering. Triton wants every array a kernel loads,
    stores or computes on to have a power-of-two size and `dot` operands of at least
    16 x 16, so tiles are powers of two (>= 16 for matmuls) and the wrappers pad
    operands to tile multiples instead of relying on masked edge blocks;
  * TPU: compiled through Mosaic where the kernel's pattern fits (see each module).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# The platform a program is being built for, when that is not the machine's own: an
# ahead-of-time compile for TPU, or a lowering for CUDA, on a CPU host
# (moma_jax/compilation/aot.py). Read at trace time, so kernels choose their TPU or GPU path.
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar('pallas_target',
                                                                     default=None)
_PLATFORM_BACKEND = {'cuda': 'gpu', 'rocm': 'gpu', 'gpu': 'gpu', 'tpu': 'tpu', 'cpu': 'cpu'}


def backend() -> str:
  """'cpu', 'gpu' or 'tpu' (anything else is treated like 'cpu'): the target set by
  `target_backend`, else the default backend."""
  return _TARGET.get() or jax.default_backend()


# The GPU a CUDA lowering on a host without one is made for: Pallas' Triton lowering reads
# the device's compute capability, and with no GPU present JAX asks for an abstract device
# (jax >= 0.11; jax 0.10 takes it too).
ABSTRACT_GPU = dict(device_kind='NVIDIA H100 80GB HBM3', num_cores=132)


def _abstract_gpu_mesh() -> jax.sharding.AbstractMesh:
  """The mesh being traced under (its axes, or none), on the abstract GPU."""
  mesh = jax.sharding.get_abstract_mesh()
  device = jax.sharding.AbstractDevice(platform='gpu', **ABSTRACT_GPU)
  return jax.sharding.AbstractMesh(mesh.axis_sizes, mesh.axis_names, mesh.axis_types,
                                   abstract_device=device)


@contextlib.contextmanager
def target_backend(platform: str) -> Iterator[None]:
  """Context: trace the kernels for `platform` ('tpu', 'cuda', 'gpu' or 'cpu') whatever
  this machine has, e.g. to compile for device-less TPU devices or lower for CUDA. A GPU
  target on a host without a GPU traces under an abstract GPU (`ABSTRACT_GPU`); enter it
  inside `jax.set_mesh`, whose axes it keeps."""
  backend_name = _PLATFORM_BACKEND[platform]
  token = _TARGET.set(backend_name)
  try:
    with contextlib.ExitStack() as stack:
      if backend_name == 'gpu' and jax.default_backend() != 'gpu':
        stack.enter_context(jax.sharding.use_abstract_mesh(_abstract_gpu_mesh()))
      yield
  finally:
    _TARGET.reset(token)


def glu(a, b, dtype):
  """silu(a) * b in float32, cast to `dtype`: the SwiGLU's gate, as the kernels apply it."""
  a = a.astype(jnp.float32)
  return (a * jax.nn.sigmoid(a) * b.astype(jnp.float32)).astype(dtype)


def glu_backward(dh, a, b, dtype):
  """(da, db) of h = silu(a) * b, in float32 math, returned in `dtype`."""
  a, b, dh = a.astype(jnp.float32), b.astype(jnp.float32), dh.astype(jnp.float32)
  sig = jax.nn.sigmoid(a)
  silu = a * sig
  return (dh * b * sig * (1 + a * (1 - sig))).astype(dtype), (dh * silu).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def glu_halves(gated, dtype):
  """glu(a, b) of gated = [a | b] ([M, 2F] -> [M, F]). Its gradient is written as one
  [M, 2F] array; differentiating the two slices would write two zero-padded ones and
  add them."""
  f = gated.shape[-1] // 2
  return glu(gated[:, :f], gated[:, f:], dtype)


def _glu_halves_fwd(gated, dtype):
  return glu_halves(gated, dtype), gated


def _glu_halves_bwd(dtype, gated, dh):
  f = gated.shape[-1] // 2
  da, db = glu_backward(dh, gated[:, :f], gated[:, f:], gated.dtype)
  return (jnp.concatenate([da, db], axis=-1),)


glu_halves.defvjp(_glu_halves_fwd, _glu_halves_bwd)


def import_tokamax():
  """The tokamax module, callable from any program. tokamax reads its settings from absl
  flags and, when nothing has parsed them yet, parses sys.argv itself, which fails on
  any argument of another program (pytest's, a notebook kernel's): its flags keep their
  defaults then. (The command-line tools parse flags before any model is traced.)"""
  import tokamax  # pylint: disable=g-import-not-at-top  # optional: the cuda12 extra
  from absl import flags  # pylint: disable=g-import-not-at-top  # a tokamax dependency
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax


def nbytes(*arrays) -> int:
  """Bytes of arrays (or ShapeDtypeStructs), for a kernel's cost estimate."""
  return int(sum(a.size * a.dtype.itemsize for a in arrays))


def cost(flops: int, bytes_accessed: int, transcendentals: int = 0) -> pl.CostEstimate:
  """A pallas_call's cost for XLA's cost analysis: without one a custom call counts as
  zero FLOPs, and a compiled program's FLOPs would look smaller than they are. Bytes are
  the operands read and the result written once (tiles re-read by several programs are
  not counted)."""
  return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                         bytes_accessed=int(bytes_accessed))


def use_interpret(interpret: bool | None) -> bool:
  """Interpret mode unless compiled Pallas exists for this backend (GPU, TPU)."""
  if interpret is None:
    return backend() not in ('gpu', 'tpu')
  return bool(interpret)


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def tile(size: int, preferred: int, minimum: int = 1) -> int:
  """A power-of-two tile for an axis of `size`: `preferred` (rounded up to a power of
  two), shrunk for small axes so tiny shapes are not padded far, at least `minimum`."""
  return max(next_pow2(minimum), min(next_pow2(preferred), next_pow2(size)))


def pad_to(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  """x zero- (or `value`-) padded along `axis` up to `size`; x itself when no padding
  is needed, so tile-aligned operands are not copied."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, extra)
  return jnp.pad(x, pads, constant_values=value)


def compiler_params(num_warps: int | None = None, num_stages: int | None = None):
  """Triton launch parameters on GPU; None elsewhere (interpret mode, TPU).

  Imported lazily: the Triton module is only needed when compiling for a GPU.
  """
  if backend() != 'gpu' or (num_warps is None and num_stages is None):
    return None
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def matmul_cost(m: int, k: int, n: int, x, ws, glu: bool) -> pl.CostEstimate:
  """M rows of x times K x N weights, once per weight in ws; glu adds a sigmoid and two
  products per output (silu(a) * b)."""
  return cost(2 * m * k * n * len(ws) + (3 * m * n if glu else 0),
              nbytes(x, *ws) + m * n * x.dtype.itemsize, m * n if glu else 0)


def normalize_index(index: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """(index with negatives wrapped numpy-style, in-range mask).

  The references (`jnp.take(mode='fill')`, `.at[].add(mode='drop')`) wrap indices in
  [-size, 0) and treat anything else outside [0, size) as absent; the kernels do the same.
  """
  index = jnp.where(index < 0, index + size, index)
  return index, (index >= 0) & (index < size)
