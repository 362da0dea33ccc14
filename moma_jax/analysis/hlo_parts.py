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

The bytes of one instruction are those it reads and writes once: its operands' and its
result's, a kernel (custom call) its own cost estimate where it gives one, an
asynchronous pair's reads at its start and its writes at its done; a while loop's body
counts as often as its known trip count. Instructions that only rename (bitcast,
tuple, get-tuple-element, parameter, constant) count nothing. An instruction without
an op_name (the compiler's own copies, layout changes and memory moves) belongs to the
part of the first instruction that uses its result, else of its first operand's.

The parts sum to less than the cost analysis' total, which also counts an operand a
fusion reads more than once as often as it reads it, and more; `with_remainder` adds
the difference as 'unattributed', so the parts add up to the total the roofline
estimate uses.
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


def _instruction_bytes(opcode: str, shape: str, operand_shapes: list[str], line: str) -> int:
  if opcode in _FREE:
    return 0
  if opcode.endswith('-done'):
    return hlo_stats.shape_bytes(shape)
  reads = sum(hlo_stats.shape_bytes(s) for s in operand_shapes)
  if opcode.endswith('-start'):
    return reads
  estimate = _ESTIMATE.search(line) if opcode == 'custom-call' else None
  return int(estimate.group(1)) if estimate else reads + hlo_stats.shape_bytes(shape)


def bytes_by_part(hlo: str) -> dict[str, int]:
  """{part: bytes accessed per program run} over PARTS (module docstring)."""
  comps = hlo_stats.computations(hlo)
  mult = hlo_stats.multipliers(comps)
  fused = {m.group(1) for lines in comps.values() for line in lines
           for m in _FUSED.finditer(line) if ' fusion(' in line or 'to_apply=' in line
           or 'custom-call(' in line}
  out = dict.fromkeys(PARTS, 0)
  for name, lines in comps.items():
    if name in fused:
      continue
    insts = {}                          # name -> (opcode, shape, operands, line)
    for line in lines:
      m = _DEF.match(line)
      if m:
        insts[m.group(1)] = (m.group(3), m.group(2), _operands(m.group(4)), line)
    users: dict[str, list[str]] = {}
    for inst, (_, _, operands, _) in insts.items():
      for o in operands:
        users.setdefault(o, []).append(inst)
    own = {}                            # name -> its part, for those that name one
    for inst, (opcode, _, _, line) in insts.items():
      found = _OP_NAME.search(line)
      if _collective(opcode):
        own[inst] = 'collectives'
      elif found:
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
      n = _instruction_bytes(opcode, shape, [insts[o][1] for o in operands if o in insts],
                             line)
      if n:
        out[label(inst)] += n * mult.get(name, 1)
  return out


def with_remainder(parts: dict[str, int], bytes_accessed: float) -> dict[str, int]:
  """parts and 'unattributed': the cost analysis' bytes_accessed less their sum."""
  return {**parts, 'unattributed': int(bytes_accessed) - sum(parts.values())}
