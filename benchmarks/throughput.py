"""Training throughput of compute-matched variants, in the layout of the paper's Table 2.

  python benchmarks/throughput.py                  # tiny: about a minute a variant on a CPU
  python benchmarks/throughput.py --layout ragged  # the exact layout (the config default)
  python benchmarks/throughput.py --size 90m --seq 4096 --batch 8 --kernels xla,pallas

In one process, for each variant — dense, moma 1t1i, moe_8x, moma 4t4i, MoD 1t1i,
MoD 4t4i — builds the model (MoD variants deeper, to the dense model's FLOPs per token:
`flops.mod_layers_matching`), compiles its jit'd training step (forward, backward,
AdamW) and runs `--warmup` steps on a random mixed-modal batch (half the tokens image,
in blocks, as in a balanced caption mix). Then `--repeats` rounds each time `--steps`
steps of every variant in turn (interleaved, so a change in the machine's load hits all
variants alike), and prints the median tokens/s, the ratio to the dense model's median,
the paper's ratio (A100, 435M-matched), and the model FLOPs utilization: against the
vendor's peak for a known accelerator, else against the peak measured here at the start
of the run (FLOP/s of a large matmul in the compute dtype). A benchmark, never a test:
numbers depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from experiments import paper_table1  # noqa: E402
from moma_jax.analysis import flops  # noqa: E402
from moma_jax import configs  # noqa: E402
from moma_jax.model import sharding  # noqa: E402
from moma_jax.model import transformer  # noqa: E402
from moma_jax.training import optimizer as optimizer_lib  # noqa: E402
from moma_jax.runs import state as train_state  # noqa: E402
from moma_jax.training import step as train_step  # noqa: E402

# (name, ffn, experts, MoD) in the paper's Table 2 order; its throughput vs dense (A100).
VARIANTS = (('dense', 'dense', (4, 4), False), ('moma_1t1i', 'moma', (1, 1), False),
            ('moe_8x', 'moe', (8,), False), ('moma_4t4i', 'moma', (4, 4), False),
            ('mod_moma_1t1i', 'moma', (1, 1), True), ('mod_moma_4t4i', 'moma', (4, 4), True))
PAPER_RATIO = {'dense': 1.0, 'moma_1t1i': 0.94, 'moe_8x': 0.91, 'moma_4t4i': 0.83,
               'mod_moma_1t1i': 0.79, 'mod_moma_4t4i': 0.69}
# Dense bfloat16 peak FLOP/s by device kind (vendor figures, without sparsity).
PEAK_FLOPS = {'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H200': 989e12,
              'NVIDIA A100-SXM4-80GB': 312e12, 'NVIDIA A100-SXM4-40GB': 312e12,
              'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5p': 459e12}


def base_config(size: str, seq: int, batch: int):
  """The dense model of `size`: 'tiny' (the quickstart's width) or a Table 1 size."""
  if size == 'tiny':
    c = configs.default_config()
    m = c.model
    m.d_model, m.num_heads, m.num_layers, m.ffn_dim = 128, 4, 4, 512
  else:
    c = paper_table1.get_config(f'dense_{size}')
  c.model.max_len = c.data.seq_len = seq
  c.train.batch_size = batch
  c.routing.group_size = min(batch, c.routing.group_size)
  return c


def variant_config(base, ffn: str, experts, mod: bool, kernels: str, layout: str, dtype):
  c = copy.deepcopy(base)    # keeps the config's typed placeholders
  m = c.model
  m.ffn, m.experts, m.kernels, m.dtype = ffn, tuple(experts), kernels, dtype
  c.routing.layout = layout
  if mod:
    m.mod.enabled = True
    m.num_layers = flops.mod_layers_matching(c)
  return configs.validate(c)


def random_batch(config, seed: int = 0):
  """[B, L] arrays: text with one image block per sequence, half the tokens."""
  rng = np.random.default_rng(seed)
  b, l = config.train.batch_size, config.data.seq_len
  modality = np.zeros((b, l), np.int8)
  for row in range(b):
    start = rng.integers(0, l // 2 + 1)
    modality[row, start:start + l // 2] = 1
  return dict(tokens=rng.integers(0, config.model.vocab_size, (b, l)).astype(np.int32),
              modality=modality, segment_ids=np.ones((b, l), np.int32),
              positions=np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy(),
              loss_mask=np.ones((b, l), np.int32))


def prepare(config, warmup: int):
  """Compiles the training step and runs `warmup` steps; returns timed(steps) -> the
  training tokens per second of `steps` more steps."""
  mesh = sharding.one_device_mesh()
  model = transformer.build(config)
  tx = optimizer_lib.optimizer(config)
  state_formats = train_state.formats(train_state.layout(model, tx, mesh)[0])
  state = train_state.create(model, tx, state_formats, seed=0)
  batch_sh = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh), sharding.axis_rules():
    step = train_step.make_train_step(model, tx, config, (state_formats, batch_sh))
    batch = sharding.global_batch(random_batch(config), batch_sh)
  done = [0]

  def run(n):
    nonlocal state
    with jax.set_mesh(mesh), sharding.axis_rules():
      for _ in range(n):
        done[0] += 1
        state, metrics = step(state, batch, jnp.int32(done[0]))
      jax.block_until_ready((state, metrics))

  run(max(1, warmup))

  def timed(steps: int) -> float:
    start = time.perf_counter()
    run(steps)
    return steps * config.train.batch_size * config.data.seq_len / (
        time.perf_counter() - start)
  return timed


def matmul_peak(dtype, size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of this device's best of `repeats` [size, size] x [size, size] matmuls."""
  a = jnp.ones((size, size), dtype)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--size', default='tiny', choices=('tiny', '90m', '435m', '1.4b'))
  p.add_argument('--seq', type=int, default=128)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--steps', type=int, default=20, help='timed steps per repeat')
  p.add_argument('--repeats', type=int, default=3,
                 help='rounds of timed steps per variant; tokens/s is their median')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--kernels', default='xla', help="comma-separated: 'xla', 'pallas'")
  p.add_argument('--layout', default='capacity', choices=configs.LAYOUTS,
                 help="row layout of the sparse FFNs (docs/design.md §4): 'capacity' "
                      "cuts the rows past a static buffer per expert, 'ragged' is exact")
  p.add_argument('--buffer_factor', type=float, default=1.0,
                 help='routing.buffer_factor of the capacity layout (2.0 holds every '
                      'row 4t4i and 1t1i can ask for at a 1/2 modality share)')
  p.add_argument('--dtype', default='float32', help='compute dtype (bfloat16 on GPU/TPU)')
  p.add_argument('--variants', default=','.join(v[0] for v in VARIANTS))
  args = p.parse_args(argv)
  wanted = args.variants.split(',')
  unknown = sorted(set(wanted) - {v[0] for v in VARIANTS})
  if unknown:
    p.error(f'unknown variants {", ".join(unknown)}')
  device = jax.devices()[0]
  measured_peak = matmul_peak(jnp.dtype(args.dtype))
  peak = PEAK_FLOPS.get(device.device_kind) or measured_peak
  base = base_config(args.size, args.seq, args.batch)
  base.routing.buffer_factor = args.buffer_factor
  layout = (f'layout {args.layout}' + (f' (factor {args.buffer_factor})'
                                        if args.layout == 'capacity' else ' (exact)'))
  against = ('it' if peak == measured_peak
             else f'the vendor peak {peak / 1e12:g} TFLOP/s')
  print(f'# throughput: size {args.size}, {args.batch} x {args.seq} tokens per step, '
        f'{args.dtype}, {layout}; median of {args.repeats} x {args.steps} timed steps '
        f'after {args.warmup}; device {device.device_kind} ({device.platform}); matmul '
        f'peak measured {measured_peak / 1e9:,.1f} GFLOP/s ({args.dtype}), MFU against '
        f'{against}')
  runs = []                            # (name, kernels, config, timed) in table order
  for kernels in args.kernels.split(','):
    for name, ffn, experts, mod in VARIANTS:
      if name not in wanted:
        continue
      try:
        config = variant_config(base, ffn, experts, mod, kernels, args.layout, args.dtype)
      except configs.ConfigError as e:
        runs.append((name, kernels, None, str(e)))
        continue
      runs.append((name, kernels, config, prepare(config, args.warmup)))
  rates = {(name, kernels): [] for name, kernels, config, _ in runs if config is not None}
  for _ in range(args.repeats):
    for name, kernels, config, timed in runs:
      if config is not None:
        rates[name, kernels].append(timed(args.steps))
  print('| variant | kernels | layers | train GFLOPs/token | tokens/s | vs dense | '
        'paper (A100) | MFU |')
  print('|---|---|---|---|---|---|---|---|')
  for name, kernels, config, timed in runs:
    if config is None:
      print(f'| {name} | {kernels} | - | - | not run: {timed} | | | |')
      continue
    rate = statistics.median(rates[name, kernels])
    dense = rates.get(('dense', kernels))
    ratio = f'{rate / statistics.median(dense):.2f}' if dense else '-'
    per_token = flops.train_flops(config)
    mfu = per_token * rate / peak
    print(f'| {name} | {kernels} | {config.model.num_layers} | {per_token / 1e9:.4g} | '
          f'{rate:,.0f} | {ratio} | {PAPER_RATIO[name]:.2f} | {mfu:.1%} |', flush=True)


if __name__ == '__main__':
  main()
