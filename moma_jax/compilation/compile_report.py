"""One step compiled for a target, measured: the rows `moma-compile` prints.

`measure(config, target, step)` builds the step from abstract inputs (moma_jax/compilation/aot.py),
compiles it (TPU) or lowers it (CUDA), and returns a plain dict (JSON-ready), per chip:
  memory      bytes: state (parameters + optimizer state; decode: parameters + KV
              cache), arguments, outputs, temporaries, code, aliased, total (see
              hlo_stats.memory), the chip's HBM, fits, and margin = HBM - total
              (negative: the shortfall); host_offload: whether arrays live in host
              memory during the step (remat 'offload');
  flops       compiled (cost_analysis, plus the splash-attention kernels' FLOPs counted
              from their blocks, `kernels_estimated`: XLA sees none), analytic (flops.py for the chip's share of the
              step's tokens: training 3 x forward, eval and decode forward), ratio =
              compiled / analytic, bytes_accessed;
  bytes_by_part  bytes accessed per part of the step (ffn, attention, routing, output,
              optimizer, collectives, rest: moma_jax/analysis/hlo_parts.py), from the
              optimized HLO's instructions, and 'unattributed': bytes_accessed less
              their sum;
  hbm_bytes_by_part, hbm_bytes  the same count of the arrays that live in HBM only
              (hlo_parts.bytes_by_part(hbm_only=True)): what the compiler keeps on the
              chip (operands it prefetched into VMEM) is left out; no remainder;
  collectives {kind: {count, bytes}} per step, and their total bytes;
  kernels     the Pallas / cuDNN custom calls, with `uncounted` naming those whose FLOPs
              XLA's cost analysis does not see;
  roofline    the estimate of chips.roofline (when the chip is in chips.CHIPS), its
              HBM time from the cost analysis' bytes_accessed; roofline_hbm the same
              with hbm_bytes. Both are estimates: the cost analysis also counts the
              chip's own VMEM copies and reads (a 16 MiB f32 column sum it prefetches
              counts 5 times its input), the HBM count misses a matmul's re-reads of
              tiles that do not stay on the chip;
  seconds     to lower and to compile.
A CUDA target is lowered only (compiling needs a GPU): it reports the kernels and, if
lowering fails, the failing op, and no memory or FLOPs.
"""
from __future__ import annotations

import re
import time
from typing import Any

import jax
import ml_collections

from moma_jax.compilation import aot
from moma_jax.analysis import chips
from moma_jax.analysis import flops
from moma_jax.analysis import hlo_parts
from moma_jax.analysis import hlo_stats
from moma_jax import configs
from moma_jax.model import attention_kernels
from moma_jax.model import kernels
from moma_jax.model import routing_spec

GIB = 2**30


def analytic_flops(config: ml_collections.ConfigDict, step: str, tokens: int,
                   devices: int) -> float:
  """flops.py's FLOPs for one chip's share of `tokens` (training 3 x forward)."""
  report = flops.count(config)
  per_token = report.train['overall'] if step == 'train' else report.forward['overall']
  return per_token * tokens / devices


def attention_kernel_flops(config: ml_collections.ConfigDict, target: aot.Target, step: str,
                           tokens: int) -> float:
  """FLOPs of one chip's share of the step's splash-attention kernels, which XLA's cost
  analysis does not count (attention_kernels.splash_flops); 0 when the step has none
  (another backend, or the decode step's cached attention)."""
  m = config.model
  if step == 'decode' or kernels.resolve_attention(m.attention, target.platform) != 'splash':
    return 0.0
  spec = routing_spec.from_config(config)
  rows, length = tokens // config.data.seq_len, config.data.seq_len
  heads, head_dim = m.num_heads, m.d_model // m.num_heads
  total = 0.0
  for is_mod in configs.mod_layers(m):
    if is_mod:   # attention among each routing group's picked tokens
      groups = rows // spec.group_size
      total += attention_kernels.splash_flops(
          groups, spec.picked_slots(spec.group_size * length), heads, head_dim,
          step == 'train')
    else:
      total += attention_kernels.splash_flops(rows, length, heads, head_dim, step == 'train')
  return total / target.num_devices


def _lowering_error(e: Exception) -> str:
  """The op a lowering failed on, in one line (the first line names it)."""
  text = ' '.join(str(e).split())
  m = re.search(r"(?:[Nn]o lowering|not implemented|[Uu]nimplemented|cannot lower)[^.]*", text)
  return (m.group(0) if m else text)[:300] or type(e).__name__


_UNITS = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
_OOM = re.compile(r'required for (?P<what>[\w ]+?) \((?P<need>[\d.]+)(?P<nu>[KMGT]?)\) '
                  r'exceeds available HBM \((?P<have>[\d.]+)(?P<hu>[KMGT]?)\)')


def out_of_memory(e: Exception) -> dict[str, Any] | None:
  """The verdict of a TPU compile that ran out of HBM, from the compiler's message
  (sizes in its binary units: G = GiB): {'fits': False, 'required', 'hbm', 'margin',
  'what', 'message'}; None for any other error."""
  text = ' '.join(str(e).split())
  if 'RESOURCE_EXHAUSTED' not in text and 'out of memory' not in text.lower():
    return None
  m = _OOM.search(text)
  found = {}
  if m:
    found = dict(required=float(m['need']) * _UNITS[m['nu']],
                 hbm=float(m['have']) * _UNITS[m['hu']], what=m['what'])
    found['margin'] = found['hbm'] - found['required']
  return dict(fits=False, message=text[:400], **found)


def _lowered_only(config: ml_collections.ConfigDict, text: str) -> dict[str, Any]:
  """What a lowering's StableHLO text shows of a GPU step: its kernels, XLA ragged_dot
  ops and the model's GPU kernel choices."""
  found = hlo_stats.kernels(text)
  m = config.model
  return dict(lowered=True, compiled=False, kernels=found,
              uncounted=[k['name'] for k in found if not k['counted']],
              # XLA's ragged_dot pads every expert's rows to all rows on GPU.
              ragged_dots=len(re.findall(r'ragged[-_]dot\b', text)),
              gpu_choice=dict(kernels=m.kernels, attention=m.attention,
                              grouped_matmul=kernels.gpu_grouped_matmul(),
                              attention_backend=kernels.resolve_attention(m.attention,
                                                                          'gpu')))


def measure(config: ml_collections.ConfigDict, target: aot.Target, step: str) -> dict[str, Any]:
  """The step `step` ('train', 'eval', 'decode') on `target` (module docstring)."""
  built = aot.build_step(config, target, step)
  start = time.perf_counter()
  out: dict[str, Any] = dict(step=step, platform=target.platform, topology=target.topology,
                             devices=target.num_devices, tokens=built.tokens)
  try:
    lowered = aot.lower(built, target)
  except Exception as e:  # pylint: disable=broad-except
    if target.platform == 'tpu':
      raise
    out.update(lowered=False, lowering_error=_lowering_error(e), kernels=[])
    return out
  out['seconds'] = dict(lower=time.perf_counter() - start)
  if target.platform != 'tpu':
    out.update(_lowered_only(config, lowered.as_text()))
    return out
  start = time.perf_counter()
  try:
    compiled = aot.compile_tpu(lowered)
  except Exception as e:  # pylint: disable=broad-except
    refused = out_of_memory(e)
    if refused is None:
      raise
    out['seconds']['compile'] = time.perf_counter() - start
    out.update(compiled=False, memory=refused)
    return out
  out['seconds']['compile'] = time.perf_counter() - start
  hlo = compiled.as_text()
  mem = hlo_stats.memory(compiled)
  mem['state'] = aot.state_bytes_per_device(built)
  mem['host_offload'] = hlo_stats.offloads_to_host(hlo)
  chip = chips.lookup(target.chip)
  if chip is not None:
    mem.update(hbm=chip.hbm_bytes, fits=mem['total'] <= chip.hbm_bytes,
               margin=chip.hbm_bytes - mem['total'])
  cost = hlo_stats.cost(compiled)
  analytic = analytic_flops(config, step, built.tokens, target.num_devices)
  coll = hlo_stats.collectives(hlo)
  coll_bytes = sum(c['bytes'] for c in coll.values())
  found = hlo_stats.kernels(hlo)
  # Splash kernels carry no cost estimate: their FLOPs are counted from their blocks.
  splash = [k for k in found if k['name'].startswith(attention_kernels.SPLASH_KERNEL_PREFIX)]
  estimated = attention_kernel_flops(config, target, step, built.tokens) if splash else 0.0
  for k in splash:
    k['counted'] = k['estimated'] = True
  compiled_flops = cost['flops'] + estimated
  hbm_parts = hlo_parts.bytes_by_part(hlo, hbm_only=True)
  out.update(compiled=True, memory=mem,
             flops=dict(compiled=compiled_flops, analytic=analytic,
                        ratio=compiled_flops / analytic if analytic else None,
                        bytes_accessed=cost['bytes_accessed'], kernels_estimated=estimated),
             bytes_by_part=hlo_parts.with_remainder(hlo_parts.bytes_by_part(hlo),
                                                    cost['bytes_accessed']),
             hbm_bytes_by_part=hbm_parts, hbm_bytes=sum(hbm_parts.values()),
             collectives=coll, collective_bytes=coll_bytes, kernels=found,
             uncounted=[k['name'] for k in found if not k['counted']])
  if chip is not None:
    # One estimate per byte count: the cost analysis' total, and the HBM count.
    for key, bytes_accessed in (('roofline', cost['bytes_accessed']),
                                ('roofline_hbm', out['hbm_bytes'])):
      out[key] = chips.roofline(chip, flops=compiled_flops, bytes_accessed=bytes_accessed,
                                collective_bytes=coll_bytes, model_flops=analytic,
                                tokens=built.tokens)
    out['chip'] = dict(name=chip.name, peak_flops=chip.peak_flops, hbm_bytes=chip.hbm_bytes,
                       hbm_bandwidth=chip.hbm_bandwidth, ici_bandwidth=chip.ici_bandwidth,
                       source=chip.source)
  return out


# ----------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------
def _gib(n: float) -> str:
  return f'{n / GIB:.2f} GiB'


def human_bytes(n: float) -> str:
  for unit, size in (('GiB', GIB), ('MiB', 2**20), ('KiB', 2**10)):
    if abs(n) >= size:
      return f'{n / size:.2f} {unit}'
  return f'{n:.0f} B'


def format_step(r: dict[str, Any]) -> list[str]:
  """Lines describing one measured step (per chip)."""
  head = f'{r["step"]} step, {r["tokens"]:,} tokens per call, {r["devices"]} x {r["platform"]}'
  if r['platform'] != 'tpu':
    lines = [head + ': lowered only (compiling for a GPU needs one); no memory or FLOPs']
    if not r.get('lowered', False):
      return lines + [f'  does not lower: {r["lowering_error"]}']
    g = r['gpu_choice']
    grouped = {'auto': g['grouped_matmul'], 'pallas': 'triton', 'xla': 'ragged_dot'}
    lines.append(f'  model.kernels={g["kernels"]}: ragged expert matmuls on '
                 f'{grouped[g["kernels"]]}; attention {g["attention_backend"]} '
                 f'(model.attention={g["attention"]}); XLA ragged_dot ops: '
                 f'{r["ragged_dots"]}')
    lines.append('  custom calls:' + ('' if r['kernels'] else ' none'))
    lines += [f'    {k["backend"]:<11} {k["name"]:<28} x{k["count"]}  ({k["target"]})'
              for k in r['kernels']]
    return lines
  m = r['memory']
  if not r['compiled']:
    lines = [head + f': DOES NOT FIT, the TPU compiler refused it after '
             f'{r["seconds"]["compile"]:.1f} s']
    if 'required' in m:
      lines.append(f'  {m["what"]} need {_gib(m["required"])} of {_gib(m["hbm"])} HBM per '
                   f'chip: {_gib(-m["margin"])} short')
    return lines + [f'  {m["message"]}']
  f = r['flops']
  lines = [head + f' (compiled in {r["seconds"]["compile"]:.1f} s)', '  memory per chip:',
           f'    parameters + optimizer state {_gib(m["state"])}'
           if r['step'] == 'train' else f'    parameters (+ KV cache) {_gib(m["state"])}',
           f'    arguments   {_gib(m["arguments"])}',
           f'    temporaries {_gib(m["temporaries"])}',
           f'    outputs     {_gib(m["outputs"])}',
           f'    code        {_gib(m["code"])}  (aliased {_gib(m["aliased"])})',
           f'    total       {_gib(m["total"])}']
  if 'hbm' in m:
    verdict = ('fits' if m['fits'] else 'DOES NOT FIT')
    how = (f'{_gib(m["margin"])} to spare' if m['fits'] else f'{_gib(-m["margin"])} short')
    lines.append(f'    HBM         {_gib(m["hbm"])}: {verdict}, {how}')
  else:
    lines.append('    HBM         unknown chip: no verdict')
  if m.get('host_offload'):
    lines.append('    host memory holds offloaded arrays during the step')
  ratio = f'{f["ratio"]:.3f}' if f['ratio'] else 'n/a'
  lines += ['  FLOPs per chip:',
            f'    compiled {f["compiled"]:.4g}, analytic (flops.py) {f["analytic"]:.4g}, '
            f'ratio {ratio}; bytes accessed {human_bytes(f["bytes_accessed"])}']
  if f.get('kernels_estimated'):
    lines.append(f'    of which {f["kernels_estimated"]:.4g} in splash attention, counted from '
                 'its blocks (XLA sees no FLOPs in it)')
  if r['uncounted']:
    lines.append('    not in the compiled FLOPs (no cost estimate): '
                 + ', '.join(sorted(set(r['uncounted']))))
  parts, hbm = r['bytes_by_part'], r['hbm_bytes_by_part']
  lines.append('  bytes accessed by part of the step (reads and writes of each instruction; '
               'unattributed: what the cost analysis counts beyond them; in HBM: of '
               'arrays in HBM only):')
  lines.append(f'    {"":<12} {"all":>10}  {"share":>6}  {"in HBM":>10}')
  lines += [f'    {p:<12} {human_bytes(b):>10}  {b / max(f["bytes_accessed"], 1):6.1%}'
            + (f'  {human_bytes(hbm[p]):>10}' if p in hbm else '')
            for p, b in parts.items()]
  lines.append(f'    {"all":<12} {human_bytes(f["bytes_accessed"]):>10}  {1:6.1%}'
               f'  {human_bytes(r["hbm_bytes"]):>10}')
  lines.append('  collectives per step:' + ('' if r['collectives'] else ' none'))
  lines += [f'    {kind:<19} x{c["count"]:<4} {human_bytes(c["bytes"])}'
            for kind, c in r['collectives'].items()]
  if r['kernels']:
    lines.append('  kernels: ' + ', '.join(f'{k["name"]} x{k["count"]} ({k["backend"]})'
                                          for k in r['kernels']))
  if 'roofline' in r:
    e = r['roofline']
    lines.append(f'  roofline ESTIMATE: step {e["step_s"] * 1e3:.2f} ms ({e["bound"]}-bound; '
                 f'compute {e["compute_s"] * 1e3:.2f}, HBM {e["memory_s"] * 1e3:.2f}, '
                 f'collectives {e["collective_s"] * 1e3:.2f} ms), MFU {e["mfu"]:.1%}, '
                 f'{e["tokens_per_sec"]:,.0f} tokens/s')
    e = r['roofline_hbm']
    lines.append(f'  roofline ESTIMATE from the HBM traffic count: step '
                 f'{e["step_s"] * 1e3:.2f} ms ({e["bound"]}-bound; HBM '
                 f'{e["memory_s"] * 1e3:.2f} ms), MFU {e["mfu"]:.1%}')
  return lines
