"""Where a compiled step's bytes go: bytes accessed per part of the step.

XLA's cost analysis gives one total ('bytes accessed'). Here the optimized HLO
(`compiled.as_text()`) is split by the part of the step each top-level instruction
belongs to, read from the scope its `op_name` names (moma_jax/model/names.py):

  ffn          the FFN matmuls: a dense block's SwiGLU, the experts' grouped matmuls
  attention    attention: projections, QK-norm, RoPE, the attention kernels
  routing      routers, expert choice, gathers of rows, the exchange's packing and
               reordering, combines; a mixture-of-depths layer's picking
  output       the output projection and the loss over the logits
  optimizer    the optimizer's update of the state, and its guard
  collectives  all-reduce, all-gather, reduce-scatter, (ragged) all-to-all, permutes
  rest         embedding, the blocks' norms and residual adds, and what no scope names

The bytes of one instruction are its reads and writes, counted as XLA's cost analysis
(HloCostAnalysis) counts them where its rule is known: an instruction reads its
operands and writes its result once; a gather reads the rows it gathers (its result's
size), not its whole operand; an update in place (dynamic-update-slice, scatter, the
output buffer of a ragged all-to-all) neither reads nor writes the buffer it updates,
only what lands in it; a fusion writes its result (only the update where its root is
an in-place dynamic-update-slice) and reads each fused parameter once per user that
reads part or a view of it (a slice, dynamic-slice or gather its result's size, a
broadcast or reshape the whole parameter again), once in all for its other users; a
kernel (custom call) counts its own cost estimate where it gives one; an asynchronous
pair reads at its start and writes at its done; a while loop's body counts as often as
its known trip count. Instructions that only rename (bitcast, tuple,
get-tuple-element, parameter, constant) count nothing. An instruction without a
traced op_name (one with no '/': the compiler's own copies, layout changes and memory
moves, which have none or carry an argument's name such as "state['opt']...mu[...]")
belongs to the part of the first instruction that uses its result, else of its first
operand's.

`hbm_only` counts only arrays in HBM, each at the size it takes there, its layout's
tiles padded (hlo_stats.hbm_shape_bytes): the operands the TPU compiler prefetches into
VMEM (layout memory space S(1)) are read from HBM once, by their copy, and their reads
on the chip are left out. On the small programs tried that keep every array in HBM (a
column sum, an elementwise add) this count is the TPU cost analysis' total; where the
compiler prefetches, the cost analysis counts the chip's copies and reads too: a column
sum of a 16 MiB f32 array counts 80 MiB there, 16 MiB here (tests/test_compile.py
compiles both).
`with_remainder` adds what the cost analysis' total holds beyond the parts (every
array, every memory space) as 'unattributed', so the parts add up to the total the
roofline estimate uses.
"""
from __future__ import annotations

import re

from moma_jax.analysis import hlo_stats
from moma_jax.model import names

PARTS = ('ffn', 'attention', 'routing', 'output', 'optimizer', 'collectives', 'rest')
# The part of an op_name: the first rule one of its segments meets.
_RULES = (('ffn', (names.EXPERT_FFN, names.DENSE_FFN)),
          ('attention', (names.ATTENTION,)),
          ('routing', (names.EXPERTS, names.ROUTING)),
          ('output', (names.OUTPUT, names.LOSS)),
          ('optimizer', (names.OPTIMIZER,)))
_FREE = frozenset(('parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant',
                   'after-all', 'partition-id', 'replica-id', 'while', 'conditional',
                   'call', 'call-start', 'call-done', 'opt-barrier', 'add-dependency'))
# Instructions that update one operand in place: its number.
_IN_PLACE = {'dynamic-update-slice': 0, 'scatter': 0, 'ragged-all-to-all': 1}
_DEF = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+)\s+=\s+(.*?)\s([a-z][\w\-]*)\((.*)$')
_REF = re.compile(r'%([\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_WRAPPED = re.compile(r'\w+\((.*)\)')
_ESTIMATE = re.compile(r'"cost_estimate":\{[^}]*?"bytes_accessed":"?(\d+)')
_FUSED = re.compile(r'(?:calls|to_apply|called_computations)=\{?%([\w.\-]+)')


def part_of(op_name: str) -> str:
  """The part (PARTS) an instruction with this op_name belongs to, 'rest' if none. A
  scope entered first inside a transformation shows wrapped in it
  ('transpose(jvp(loss))'): segments are read unwrapped."""
  segments = {_unwrapped(s) for s in op_name.split('/')}
  for part, scope_names in _RULES:
    if segments.intersection(scope_names):
      return part
  return 'rest'


def _unwrapped(segment: str) -> str:
  while (inner := _WRAPPED.fullmatch(segment)) is not None:
    segment = inner.group(1)
  return segment


def _operands(args: str) -> list[str]:
  """Names of the operands in 'a, b), attributes...' (the text after 'opcode(')."""
  depth = 1
  for i, ch in enumerate(args):
    depth += (ch == '(') - (ch == ')')
    if depth == 0:
      return _REF.findall(args[:i])
  return _REF.findall(args)


def _collective(opcode: str) -> bool:
  base = opcode.removesuffix('-start').removesuffix('-done')
  return base in hlo_stats.COLLECTIVES


class _Computation:
  """One computation's instructions: name -> (opcode, shape, operands, line), their
  users, its parameters by number and its root."""

  def __init__(self, lines: list[str]):
    self.insts: dict[str, tuple[str, str, list[str], str]] = {}
    self.params: dict[int, str] = {}
    self.root = None
    for line in lines:
      m = _DEF.match(line)
      if not m:
        continue
      name, opcode = m.group(1), m.group(3)
      self.insts[name] = (opcode, m.group(2), _operands(m.group(4)), line)
      if opcode == 'parameter':
        self.params[int(re.match(r'(\d+)', m.group(4)).group(1))] = name
      if line.lstrip().startswith('ROOT'):
        self.root = name
    self.users: dict[str, list[str]] = {}
    for inst, (_, _, operands, _) in self.insts.items():
      for o in dict.fromkeys(operands):
        self.users.setdefault(o, []).append(inst)

  def shape_bytes(self, inst: str) -> int:
    return hlo_stats.shape_bytes(self.insts[inst][1]) if inst in self.insts else 0


def _called(line: str) -> str | None:
  found = _FUSED.search(line)
  return found.group(1) if found else None


def _parameter_read_bytes(comps: dict[str, _Computation], comp: _Computation,
                          param: str) -> int:
  """Bytes a fusion reads of one fused parameter (HloCostAnalysis'
  FusionParameterReadBytes): per slicing, broadcasting or reshaping user, per nested
  fusion what that fusion reads of it, and the whole parameter once for the rest."""
  total, whole_read = 0, False
  own = comp.shape_bytes(param)
  for user in comp.users.get(param, ()):
    opcode, shape, operands, line = comp.insts[user]
    if opcode == 'fusion' and (inner := comps.get(_called(line))) is not None:
      total += sum(_parameter_read_bytes(comps, inner, inner.params[i])
                   for i, o in enumerate(operands) if o == param and i in inner.params)
    elif opcode == 'slice':
      total += hlo_stats.shape_bytes(shape)
    elif opcode in ('dynamic-slice', 'gather'):
      total += hlo_stats.shape_bytes(shape) if operands[0] == param else own
    elif opcode == 'dynamic-update-slice':
      total += comp.shape_bytes(operands[1]) if operands[0] == param else own
    elif opcode in ('broadcast', 'reshape'):
      total += own
    elif not whole_read:
      whole_read = True
      total += own
  return total


def _fusion_bytes(comps: dict[str, _Computation], line: str, operand_shapes: list[str],
                  size) -> int | None:
  """A fusion's reads (per fused parameter) and writes (an in-place
  dynamic-update-slice output writes its update only), of the buffers `size` counts
  (one it gives 0 bytes is not counted), each scaled by the size `size` gives its whole
  buffer over the buffer's own bytes (a tiled layout's padding); None if the fusion's
  body is not in the text."""
  comp = comps.get(_called(line))
  if comp is None or comp.root is None:
    return None
  scale = lambda buffer: size(buffer) / max(hlo_stats.shape_bytes(buffer), 1)
  reads = sum(_parameter_read_bytes(comps, comp, p) * scale(operand_shapes[i])
              for i, p in comp.params.items() if i < len(operand_shapes))
  root_op, _, root_operands, _ = comp.insts[comp.root]
  outputs = root_operands if root_op == 'tuple' else [comp.root]
  writes = 0
  for out in outputs:
    if out not in comp.insts:
      continue
    opcode, buffer, operands, _ = comp.insts[out]
    written = (comp.shape_bytes(operands[1]) if opcode == 'dynamic-update-slice'
               else hlo_stats.shape_bytes(buffer))
    writes += written * scale(buffer)
  return round(reads + writes)


def _instruction_bytes(comps: dict[str, _Computation], opcode: str, shape: str,
                       operand_shapes: list[str], line: str, size) -> int:
  if opcode in _FREE:
    return 0
  if opcode.endswith('-done'):
    return size(shape)
  reads = sum(size(s) for s in operand_shapes)
  if opcode.endswith('-start'):
    return reads
  if opcode == 'fusion' and (
      fused := _fusion_bytes(comps, line, operand_shapes, size)) is not None:
    return fused
  if opcode == 'gather' and operand_shapes and size(operand_shapes[0]):
    # It reads the rows it gathers, not its whole operand.
    reads += size(shape) - size(operand_shapes[0])
  elif opcode in _IN_PLACE and len(operand_shapes) > _IN_PLACE[opcode]:
    # Its result is one operand's buffer, updated where it writes: that operand is not
    # read, and the result is written where the update lands (a ragged all-to-all's
    # received rows: at most its result).
    reads -= size(operand_shapes[_IN_PLACE[opcode]])
    update = {'dynamic-update-slice': operand_shapes[1:2],
              'scatter': operand_shapes[2:]}.get(opcode, [shape])
    return reads + sum(size(s) for s in update)
  estimate = _ESTIMATE.search(line) if opcode == 'custom-call' else None
  return int(estimate.group(1)) if estimate else reads + size(shape)


def bytes_by_part(hlo: str, hbm_only: bool = False) -> dict[str, int]:
  """{part: bytes accessed per program run} over PARTS (module docstring); hbm_only:
  only the reads and writes of arrays in HBM, as laid out there
  (hlo_stats.hbm_shape_bytes), which leaves out what the compiler keeps on the chip."""
  size = hlo_stats.hbm_shape_bytes if hbm_only else hlo_stats.shape_bytes
  texts = hlo_stats.computations(hlo)
  mult = hlo_stats.multipliers(texts)
  comps = {name: _Computation(lines) for name, lines in texts.items()}
  fused = {m.group(1) for lines in texts.values() for line in lines
           for m in _FUSED.finditer(line) if ' fusion(' in line or 'to_apply=' in line
           or 'custom-call(' in line}
  out = dict.fromkeys(PARTS, 0)
  for name, comp in comps.items():
    if name in fused:
      continue
    insts, users = comp.insts, comp.users
    own = {}                            # name -> its part, for those that name one
    for inst, (opcode, _, _, line) in insts.items():
      found = _OP_NAME.search(line)
      if _collective(opcode):
        own[inst] = 'collectives'
      elif found and '/' in found.group(1):
        own[inst] = part_of(found.group(1))

    def label(inst: str) -> str:
      """Its own part, else the nearest user's (breadth first), else the nearest
      operand's, else 'rest'."""
      for step in (lambda i: users.get(i, ()), lambda i: insts[i][2]):
        seen, frontier = {inst}, [inst]
        while frontier:
          for i in frontier:
            if i in own:
              return own[i]
          frontier = [j for i in frontier for j in step(i) if j in insts and j not in seen]
          seen.update(frontier)
      return 'rest'

    for inst, (opcode, shape, operands, line) in insts.items():
      n = _instruction_bytes(comps, opcode, shape,
                             [insts[o][1] for o in operands if o in insts], line, size)
      if n:
        out[label(inst)] += n * mult.get(name, 1)
  return out


def with_remainder(parts: dict[str, int], bytes_accessed: float) -> dict[str, int]:
  """parts and 'unattributed': the cost analysis' bytes_accessed less their sum."""
  return {**parts, 'unattributed': int(bytes_accessed) - sum(parts.values())}
