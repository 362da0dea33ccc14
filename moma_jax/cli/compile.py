"""moma-compile: will it fit? Compile an experiment's steps for a TPU pod slice or a GPU.

Usage:
  moma-compile --config FILE[:ARG] [--topology v5p:2x2x2] [--platform tpu|cuda]
      [--build train[,eval,decode]] [--variants dense,moma_4t4i,...]
      [--remat none,block_input,...] [--tiles auto,512x512x1024,...] [--json]
      [--config.a.b=VALUE ...]
  moma-compile --config experiments/quickstart.py:moma_4t4i --topology v5p:2x2x1 \
      --config.mesh.data=2 --config.mesh.expert=2 --config.routing.group_size=4

Builds the experiment's model, optimizer state and mesh over the topology's devices —
device-less TPU devices from libtpu, so no TPU is needed (`pip install -e '.[tpu]'`) —
and compiles the training step (and with --build the evaluation step and the KV-cache
decode step; decoding a routed model includes the auxiliary routers moma-aux adds) from
abstract shapes, then prints per chip: parameters + optimizer state, temporaries,
outputs and their total against the chip's HBM (fits, or by how much it does not);
compiled FLOPs beside flops.py's for the same tokens and their ratio; the collectives of
the optimized program by kind with their bytes per step; the Pallas kernels; and a
roofline ESTIMATE of step time and MFU (moma_jax/analysis/chips.py). Not fitting is a result:
exit 0. A topology whose devices cannot hold the config's mesh or routing groups, like
any bad flag or config, is one line on stderr and exit 2.

--platform cuda lowers for a GPU on one device instead (compiling needs the GPU) and
lists the custom calls (Triton, Mosaic GPU, cuDNN) or the op that fails to lower.

--variants V1,V2,...: the same file's variants (the config ARG's size suffix kept, e.g.
paper_table1.py:dense_435m with moma_4t4i gives moma_4t4i_435m; the same overrides),
training step only, as the paper's Table 2: compiled FLOPs per token, bytes accessed,
collective bytes, memory per chip, and the estimated tokens/s ratio to the first
variant (from the cost analysis' bytes, and from the HBM traffic count) beside the
paper's measured ratio to dense (A100); then where each variant's bytes go, part by
part (moma_jax/analysis/hlo_parts.py), as multiples of the first's: every byte the
cost analysis counts, then those of arrays in HBM.
Every compiled step also lists its bytes by part.

--remat P1,P2,... and --tiles T1,T2,...: the training step once per rematerialization
policy (model.remat; moma_jax/model/remat.py) or per TPU grouped matmul tiling
(model.matmul_tiles: auto or TMxTKxTN; pallas_kernels/megablox_tiles.py): parameters +
optimizer state, temporaries, total per chip, whether it fits, compiled / analytic
FLOPs (recomputation and padded rows show there), bytes accessed and the estimated
step.

--json prints one JSON object: {'config', 'topology', 'platform', 'steps': [per step,
moma_jax/compilation/compile_report.py's fields]} or, with --variants, --remat or --tiles,
{'variants' | 'remat' | 'matmul_tiles': [...]}.
"""
from __future__ import annotations

import copy
import functools
import json
import re
import sys
from typing import Sequence

from absl import flags
import ml_collections

from moma_jax.compilation import aot
from moma_jax.compilation import compile_report
from moma_jax.cli import command as cli
from moma_jax import configs

PROG = 'moma-compile'
CONFIG = cli.define_config_flag()
TOPOLOGY = cli.define_once(flags.DEFINE_string, 'topology', 'v5p:2x2x2',
                           'TPU topology, GENERATION:SHAPE, e.g. v5p:2x2x2, v5p:4x4x4')
PLATFORM = cli.define_once(
    lambda name, default, text: flags.DEFINE_enum(name, default, aot.PLATFORMS, text),
    'platform', 'tpu', 'tpu: compile for --topology; cuda: lower for one GPU')
# Not --steps: moma-aux's --steps is an integer, and the two share a flag namespace
# wherever both are imported into one process (tests, notebooks).
BUILD = cli.define_once(flags.DEFINE_list, 'build', ['train'],
                        f'the steps to build, of {",".join(aot.STEPS)}')
VARIANTS = cli.define_once(flags.DEFINE_list, 'variants', [],
                           'variants of the same experiment file to compare (train step)')
REMAT = cli.define_once(flags.DEFINE_list, 'remat', [],
                        'rematerialization policies to compare (model.remat values, '
                        'e.g. none,block_input,block_outputs): the training step once each, '
                        'memory and FLOPs side by side')
TILES = cli.define_once(flags.DEFINE_list, 'tiles', [],
                        'TPU grouped matmul tilings to compare (model.matmul_tiles values, '
                        'e.g. auto,128x128x128,512x512x1024): the training step once each, '
                        'memory, FLOPs and bytes side by side')
# The flags that compile the training step once per value of a model field.
SWEEPS = {'remat': REMAT, 'matmul_tiles': TILES}
JSON = cli.define_once(flags.DEFINE_bool, 'json', False,
                       'print one JSON object instead of text')
# Throughput relative to dense measured in the paper (435M-matched, A100).
PAPER_RATIO = {'dense': 1.0, 'moe_8x': 0.91, 'moma_1t1i': 0.94, 'moma_4t4i': 0.83,
               'mod_moma_1t1i': 0.79, 'mod_moma_4t4i': 0.69}
_SIZE = re.compile(r'.*?_((?:\d+(?:\.\d+)?[mb]))$')


def target_of(config: ml_collections.ConfigDict) -> aot.Target:
  if PLATFORM.value == 'tpu':
    return aot.tpu_target(config, TOPOLOGY.value)
  return aot.cuda_target(config)


def _describe(config: ml_collections.ConfigDict, target: aot.Target) -> str:
  m = config.model
  ffn = configs.ffn_label(m)
  mesh = ' x '.join(f'{a}={target.mesh.shape[a]}' for a in target.mesh.axis_names)
  return (f'{cli.config_argument()}: {ffn}{" + MoD" if m.mod.enabled else ""}, '
          f'{m.num_layers} layers, d {m.d_model}, {m.dtype}, kernels {m.kernels}, '
          f'layout {config.routing.layout}, remat {m.remat}; batch {config.train.batch_size}'
          f' x {config.data.seq_len}, routing groups of {config.routing.group_size}\n'
          f'  target {target.platform} {target.topology} ({target.num_devices} device'
          f'{"s" if target.num_devices != 1 else ""}), '
          f'mesh {mesh}')


def main(config: ml_collections.ConfigDict, argv: Sequence[str]) -> None:
  """argv: the whole command line, which --variants parses again once per variant."""
  steps = [s.strip() for s in BUILD.value if s.strip()]
  for s in steps:
    if s not in aot.STEPS:
      raise cli.UsageError(f'--build: unknown step {s!r}; one of {", ".join(aot.STEPS)}')
  if VARIANTS.value:
    return _variants(argv)
  for field, flag in SWEEPS.items():
    values = [v.strip() for v in flag.value if v.strip()]
    if values:
      return _sweep(config, field, values)
  target = target_of(config)
  results = [compile_report.measure(config, target, s) for s in steps]
  if JSON.value:
    print(json.dumps(dict(config=cli.config_argument(), topology=target.topology,
                          platform=target.platform, steps=results), indent=1))
    return
  lines = [_describe(config, target)]
  for r in results:
    lines += compile_report.format_step(r)
  print('\n'.join(lines), flush=True)


# ----------------------------------------------------------------------------------
# Variants: the paper's Table 2 from compiled programs
# ----------------------------------------------------------------------------------
def _variant_arg(base: str, variant: str) -> str:
  """FILE:ARG of `variant` given the command line's FILE[:ARG] (size suffix kept)."""
  path, _, arg = base.partition(':')
  size = _SIZE.fullmatch(arg)
  return f'{path}:{variant}_{size.group(1)}' if size else f'{path}:{variant}'


def _argv_with_config(argv: Sequence[str], value: str) -> list[str]:
  out, skip = [], False
  for i, a in enumerate(argv):
    if skip:
      skip = False
    elif re.fullmatch(r'-{1,2}config', a):
      out += [a, value]
      skip = i + 1 < len(argv)
    elif re.fullmatch(r'-{1,2}config=.*', a):
      out.append(a.split('=', 1)[0] + '=' + value)
    else:
      out.append(a)
  return out


def _variants(argv: Sequence[str]) -> None:
  """Each variant parsed afresh from the command line, with the same overrides."""
  base = cli.config_argument()
  if PLATFORM.value != 'tpu':
    raise cli.UsageError('--variants compiles, so it needs --platform tpu')
  rows = []
  for v in (x.strip() for x in VARIANTS.value if x.strip()):
    config = cli.parse(_argv_with_config(argv, _variant_arg(base, v)), PROG)
    target = target_of(config)
    r = compile_report.measure(config, target, 'train')
    r['variant'] = v
    rows.append(r)
  for key, ratio in (('roofline', 'ratio_to_first'), ('roofline_hbm', 'hbm_ratio_to_first')):
    ref = rows[0].get(key, {}).get('tokens_per_sec')
    for r in rows:
      tps = r.get(key, {}).get('tokens_per_sec')
      r[ratio] = tps / ref if tps and ref else None
  for r in rows:
    r['paper_ratio'] = PAPER_RATIO.get(r['variant'])
  if JSON.value:
    print(json.dumps(dict(config=base, topology=TOPOLOGY.value, variants=rows), indent=1))
    return
  print('\n'.join(variants_table(base, TOPOLOGY.value, rows)), flush=True)


def variants_table(base: str, topology: str, rows: list[dict]) -> list[str]:
  """The --variants text: one line per variant, then where their bytes go."""
  head = (f'{"variant":<15} {"GFLOPs/token":>12} {"bytes/token":>11} {"coll/step":>11} '
          f'{"mem/chip":>10} {"fits":>5} {"est tok/s":>11} {"ratio":>6} {"hbm":>6} '
          f'{"paper":>6}')
  lines = [f'{base} variants on {topology} (training step; per-token figures over '
           'all chips; tok/s and ratio are roofline ESTIMATES, hbm the ratio estimated '
           'from the HBM traffic count)', head]
  fmt = lambda x, spec: format(x, spec) if x is not None else '-'
  for r in rows:
    per_token = r['devices'] / r['tokens']
    fits = r['memory'].get('fits')
    if not r['compiled']:
      short = -r['memory'].get('margin', float('nan')) / 2**30
      lines.append(f'{r["variant"]:<15} does not fit: the compiler refused it '
                   f'({short:.2f} GiB short)')
      continue
    size = compile_report.human_bytes
    lines.append(
        f'{r["variant"]:<15} {r["flops"]["compiled"] * per_token / 1e9:>12.4g} '
        f'{size(r["flops"]["bytes_accessed"] * per_token):>11} '
        f'{size(r["collective_bytes"]):>11} {size(r["memory"]["total"]):>10} '
        f'{("yes" if fits else "no") if fits is not None else "?":>5} '
        f'{fmt(r.get("roofline", {}).get("tokens_per_sec"), ",.0f"):>11} '
        f'{fmt(r["ratio_to_first"], ".2f"):>6} {fmt(r["hbm_ratio_to_first"], ".2f"):>6} '
        f'{fmt(r["paper_ratio"], ".2f"):>6}')
  return (lines + _parts_table(rows, 'bytes_by_part', 'reads and writes of each '
                               'instruction of the compiled step, by the part of the '
                               'model it belongs to (unattributed: what the cost '
                               'analysis counts beyond them)')
          + _parts_table(rows, 'hbm_bytes_by_part', 'the same, of the arrays in HBM '
                         'only (what the compiler keeps on the chip left out)'))


def _parts_table(rows: list[dict], key: str, what: str) -> list[str]:
  """Bytes per part of the step (analysis/hlo_parts.py) from rows' `key`, per token over
  all chips, the variants side by side, each with its multiple of the first's."""
  rows = [r for r in rows if r['compiled']]
  if not rows:
    return []
  size = compile_report.human_bytes
  head = f'{"bytes/token":<12}' + ''.join(f' {r["variant"]:>22}' for r in rows)
  lines = ['', f'where the bytes go: {what}', head]
  first = rows[0][key]
  for part in list(first) + ['all']:
    cells = []
    for r in rows:
      parts, scale = r[key], r['devices'] / r['tokens']
      b = sum(parts.values()) if part == 'all' else parts[part]
      ref = sum(first.values()) if part == 'all' else first[part]
      times = f'{b / ref:.2f}x' if ref else '-'
      cells.append(f' {size(b * scale):>14} {times:>7}')
    lines.append(f'{part:<12}' + ''.join(cells))
  return lines


def _sweep(config: ml_collections.ConfigDict, field: str, values: list[str]) -> None:
  """The training step compiled once per value of `model.<field>` (--remat, --tiles):
  memory per chip, FLOPs and bytes side by side."""
  swept = []
  for v in values:                      # every value checked before anything compiles
    c = copy.deepcopy(config)
    c.model[field] = v
    try:
      swept.append(configs.validate(c))
    except configs.ConfigError as e:
      raise cli.UsageError(f'--{SWEEPS[field].name}: {e}') from e
  target, rows = target_of(config), []
  for v, c in zip(values, swept):
    r = compile_report.measure(c, target, 'train')
    r[field] = v
    rows.append(r)
  if JSON.value:
    print(json.dumps(dict(config=cli.config_argument(), topology=target.topology,
                          **{field: rows}), indent=1))
    return
  size = compile_report.human_bytes
  lines = [_describe(config, target).replace(f'{field} {config.model[field]}',
                                             f'{field} below'),
           f'{field:<14} {"params+opt":>11} {"temporaries":>12} {"total":>10} '
           f'{"fits":>5} {"FLOPs ratio":>11} {"bytes":>11} {"est step":>10} '
           f'{"host memory":>12}']
  for r in rows:
    mem = r['memory']
    if not r['compiled']:
      short = -mem.get('margin', float('nan')) / 2**30
      lines.append(f'{r[field]:<14} does not fit: the compiler refused it '
                   f'({short:.2f} GiB short)')
      continue
    fits = mem.get('fits')
    step = r.get('roofline', {}).get('step_s')
    lines.append(f'{r[field]:<14} {size(mem["arguments"]):>11} {size(mem["temporaries"]):>12} '
                 f'{size(mem["total"]):>10} '
                 f'{("yes" if fits else "no") if fits is not None else "?":>5} '
                 f'{r["flops"]["ratio"] or float("nan"):>11.3f} '
                 f'{size(r["flops"]["bytes_accessed"]):>11} '
                 f'{f"{step * 1e3:.1f} ms" if step else "-":>10} '
                 f'{"used" if mem.get("host_offload") else "-":>12}')
  lines.append('(est step: the roofline ESTIMATE)')
  print('\n'.join(lines), flush=True)


def run(argv: Sequence[str] | None = None) -> None:
  """Console script entry point (`moma-compile`); argv[0] is the program name."""
  argv = list(sys.argv if argv is None else argv)
  cli.run_main(functools.partial(main, argv=argv), argv, prog=PROG, usage=__doc__,
               host_devices=False)


if __name__ == '__main__':
  run(sys.argv)
