"""What a compiled (or lowered) program holds: memory, cost, collectives, custom calls.

Per device, from one SPMD program (every chip runs the same one):
  memory(compiled)       bytes of arguments, outputs, temporaries, generated code and
                         aliased buffers (`compiled.memory_analysis()`); total = arguments
                         + outputs + temporaries + code - aliased.
  cost(compiled)         FLOPs, transcendentals and bytes accessed (`cost_analysis()`).
                         A custom call counts only through the cost estimate its kernel
                         gave (Pallas `cost_estimate=`); `kernels` says which did.
  collectives(hlo)       per kind (all-to-all, ragged-all-to-all, all-gather,
                         reduce-scatter, all-reduce, collective-permute): how many run per
                         step and the bytes they produce (their result shapes), a loop body
                         counted as many times as the loop's known trip count.
  kernels(text)          the kernel custom calls: Mosaic TPU, Triton, Mosaic GPU, cuDNN,
                         with whether XLA's cost analysis counts them.
`hlo` is `compiled.as_text()` (optimized HLO); `kernels` also reads a lowering's
StableHLO text (`lowered.as_text()`), where a CUDA program without a GPU stops.
"""
from __future__ import annotations

import collections
import math
import re
from typing import Any

COLLECTIVES = ('all-to-all', 'ragged-all-to-all', 'all-gather', 'reduce-scatter',
               'all-reduce', 'collective-permute')
# Custom-call targets of kernels, and the backend that wrote them.
KERNEL_TARGETS = {
    'tpu_custom_call': 'Mosaic TPU',
    '__gpu$xla.gpu.triton': 'Triton',
    'mosaic_gpu': 'Mosaic GPU',
    'mosaic_gpu_v2': 'Mosaic GPU',
}
CUDNN_PREFIX = '__cudnn$'
_BYTES = {'pred': 1, 's4': 1, 'u4': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1,
          's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4,
          's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
# An array shape and its layout, if written: dtype, dimensions, '{minor_to_major:tiles}'.
_ARRAY = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([\d,]*)\](\{[^}]*\})?')
_SPACE = re.compile(r'S\((\d+)\)')
_TILE = re.compile(r'T\(([\d,]+)\)')
_COLLECTIVE = re.compile(r'\s(' + '|'.join(COLLECTIVES) + r')(-start|-done)?\(')
_HEADER = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_WHILE = re.compile(r'\swhile\(.*?body=%?([\w.\-]+)')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def shape_bytes(text: str) -> int:
  """Bytes of every array shape written in `text` (a tuple's elements summed)."""
  return sum(_BYTES[dt] * math.prod(int(d) for d in dims.split(',') if d)
             for dt, dims, _ in _ARRAY.findall(text))


def hbm_shape_bytes(text: str) -> int:
  """Bytes the array shapes in `text` that live in the chip's main memory (HBM) take
  there, as laid out: a TPU layout's first tile pads the dimensions it covers
  (`f32[8,8]{1,0:T(8,128)}` holds 8 x 128 floats; a scalar `{:T(128)}` 128). Arrays
  whose layout names another memory space are left out: `S(n)`, n > 0, places an array
  on the chip (n = 1: VMEM, where the compiler prefetches operands) or in host memory."""
  total = 0
  for dtype, dims, layout in _ARRAY.findall(text):
    space = _SPACE.search(layout)
    if space and space.group(1) != '0':
      continue
    total += _BYTES[dtype] * _laid_out_elements(
        [int(d) for d in dims.split(',') if d], layout)
  return total


def _laid_out_elements(dims: list[int], layout: str) -> int:
  """Elements an array of these dimensions occupies under `layout` ('{1,0:T(8,128)}',
  '' for none): its physical order (minor_to_major) padded by the first tile."""
  order, _, tiling = layout.strip('{}').partition(':')
  minor_to_major = [int(d) for d in order.split(',') if d.strip()]
  physical = ([dims[i] for i in reversed(minor_to_major)]
              if len(minor_to_major) == len(dims) else list(dims))   # major first
  tile = _TILE.search(tiling)
  if tile:
    sizes = [int(t) for t in tile.group(1).split(',')]
    physical = [1] * max(0, len(sizes) - len(physical)) + physical
    for k, size in enumerate(reversed(sizes)):
      i = len(physical) - 1 - k
      physical[i] = -(-physical[i] // size) * size
  return math.prod(physical)


def memory(compiled) -> dict[str, int]:
  """Per-device bytes of the compiled program (see module docstring for `total`)."""
  m = compiled.memory_analysis()
  out = dict(arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
             temporaries=int(m.temp_size_in_bytes),
             code=int(m.generated_code_size_in_bytes), aliased=int(m.alias_size_in_bytes))
  out['total'] = (out['arguments'] + out['outputs'] + out['temporaries'] + out['code']
                  - out['aliased'])
  return out


def cost(compiled) -> dict[str, float]:
  """Per-device FLOPs, transcendentals and bytes accessed of the compiled program."""
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):       # older jax: one dict per program
    c = c[0] if c else {}
  return dict(flops=float(c.get('flops', 0.0)),
              transcendentals=float(c.get('transcendentals', 0.0)),
              bytes_accessed=float(c.get('bytes accessed', 0.0)))


def computations(hlo: str) -> dict[str, list[str]]:
  """Computation name -> its instruction lines."""
  comps, name = {}, None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header and ' = ' not in line.split('{', 1)[0]:
      name = header.group(1)
      comps[name] = []
    elif name is not None:
      comps[name].append(line)
  return comps


def multipliers(comps: dict[str, list[str]]) -> dict[str, int]:
  """How many times each computation runs per call of the program: a while body as often
  as its known trip count (times its parent's), everything else once."""
  mult = dict.fromkeys(comps, 1)
  edges = []
  for parent, lines in comps.items():
    for line in lines:
      loop = _WHILE.search(line)
      if loop:
        trip = _TRIP.search(line)
        edges.append((parent, loop.group(1), int(trip.group(1)) if trip else 1))
  for _ in range(4):                      # nested loops: a few rounds settle them
    for parent, body, trip in edges:
      if body in mult:
        mult[body] = mult.get(parent, 1) * trip
  return mult


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """{kind: {'count', 'bytes'}} per program run; asynchronous pairs counted at '-done'
  (whose result is the collective's output), kinds absent from the program omitted."""
  comps = computations(hlo)
  mult = multipliers(comps)
  out: dict[str, dict[str, int]] = {}
  for name, lines in comps.items():
    for line in lines:
      if ' = ' not in line:
        continue
      rhs = line.split(' = ', 1)[1]              # 'TYPE opcode(operands), attributes'
      match = _COLLECTIVE.search(rhs)
      if not match or match.group(2) == '-start':
        continue
      entry = out.setdefault(match.group(1), dict(count=0, bytes=0))
      entry['count'] += mult[name]
      entry['bytes'] += mult[name] * shape_bytes(rhs[:match.start()])
  return {k: out[k] for k in COLLECTIVES if k in out}


def _backend(target: str) -> str | None:
  if target in KERNEL_TARGETS:
    return KERNEL_TARGETS[target]
  return 'cuDNN' if target.startswith(CUDNN_PREFIX) else None


_HLO_CALL = re.compile(r'custom_call_target="([^"]+)"')
_MLIR_CALL = re.compile(r'stablehlo\.custom_call @([^\s(]+)\(')
_MLIR_NAME = re.compile(r'\bname = "([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]+)"')
# TPU kernels XLA itself emits that only move or index data: nothing to count.
FLOP_FREE = ('ragged-dot-metadata',)   # the group offsets of XLA's own ragged_dot
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([A-Za-z_][\w-]*?)(?:\.\d+)?\s+=')


def kernels(text: str) -> list[dict[str, Any]]:
  """The kernel custom calls in HLO or StableHLO text, grouped by (backend, target,
  name): [{'backend', 'target', 'name', 'count', 'counted'}], most frequent first.

  counted: whether XLA's cost analysis sees the kernel's FLOPs — a Mosaic TPU call with
  a cost estimate in its config, or one that does no arithmetic (FLOP_FREE); Triton, Mosaic GPU and cuDNN calls are not (Triton's
  lowering drops the estimate), nor is anything in a program that was only lowered.
  """
  groups: dict[tuple, int] = collections.Counter()
  counted: dict[tuple, bool] = {}
  for line in text.splitlines():
    m = _HLO_CALL.search(line) or _MLIR_CALL.search(line)
    backend = _backend(m.group(1)) if m else None
    if backend is None:
      continue
    name = _MLIR_NAME.search(line) if m.re is _MLIR_CALL else None
    if name is None:
      # HLO names a Mosaic call by where it was traced: '.../jit(gmm)/pallas_call'.
      # Without that, the instruction is named after the kernel ('%splash_mha_fwd.1').
      op = _OP_NAME.search(line)
      parts = [p for p in (op.group(1).split('/') if op else []) if p != 'pallas_call']
      inst = _INSTRUCTION.match(line)
      name_text = (re.sub(r'^\w+\((.*)\)$', r'\1', parts[-1]) if parts else
                   inst.group(1) if inst and inst.group(1) != 'custom-call' else '?')
    else:
      name_text = name.group(1)
    key = (backend, m.group(1), name_text)
    groups[key] += 1
    counted[key] = (backend == 'Mosaic TPU' and m.re is _HLO_CALL
                    and ('"cost_estimate"' in line or name_text in FLOP_FREE))
  return [dict(backend=b, target=t, name=n, count=c, counted=counted[(b, t, n)])
          for (b, t, n), c in groups.most_common()]


def offloads_to_host(hlo: str) -> bool:
  """Whether the compiled program keeps arrays in host memory during the step (the
  memory space S(5) in TPU HLO shapes: what the 'offload' remat policy asks for)."""
  return 'S(5)' in hlo
