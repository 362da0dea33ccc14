"""Training throughput of compute-matched variants, in the layout of the paper's Table 2.

  python benchmarks/throughput.py                       # tiny, seconds per variant on a CPU
  python benchmarks/throughput.py --size 90m --seq 4096 --batch 8 --kernels xla,pallas

In one process, for each variant — dense, moma 1t1i, moe_8x, moma 4t4i, MoD 1t1i,
MoD 4t4i — builds the model (MoD variants deeper, to the dense model's FLOPs per token:
`flops.mod_layers_matching`), times `--steps` jit'd training steps (forward, backward,
AdamW) on random mixed-modal batches (half the tokens image, in blocks, as in a
balanced caption mix) after `--warmup` steps, and prints tokens/s, the ratio to the
dense model's, the paper's ratio (A100, 435M-matched), and the model FLOPs utilization
where the device's peak is known. A benchmark, never a test: numbers depend on the
machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from experiments import paper_table1  # noqa: E402
from moma_jax import configs  # noqa: E402
from moma_jax import flops  # noqa: E402
from moma_jax import optimizer as optimizer_lib  # noqa: E402
from moma_jax import sharding  # noqa: E402
from moma_jax import train  # noqa: E402
from moma_jax import train_state  # noqa: E402
from moma_jax.model import transformer  # noqa: E402

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


def measure(config, steps: int, warmup: int) -> float:
  """Training tokens per second over `steps` steps, after `warmup` (compiling) ones."""
  mesh = sharding.one_device_mesh()
  model = transformer.build(config)
  tx = optimizer_lib.optimizer(config)
  _, state_sh = train_state.layout(model, tx, mesh)
  state = train_state.create(model, tx, state_sh, seed=0)
  batch_sh = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh), sharding.axis_rules():
    step = train.make_train_step(model, tx, config, (state_sh, batch_sh))
    batch = sharding.global_batch(random_batch(config), batch_sh)
    one = jnp.float32(1)
    for i in range(warmup):
      state, metrics = step(state, batch, jnp.int32(i + 1), one)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(steps):
      state, metrics = step(state, batch, jnp.int32(warmup + i + 1), one)
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - start
  return steps * config.train.batch_size * config.data.seq_len / elapsed


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--size', default='tiny', choices=('tiny', '90m', '435m', '1.4b'))
  p.add_argument('--seq', type=int, default=128)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--kernels', default='xla', help="comma-separated: 'xla', 'pallas'")
  p.add_argument('--layout', default='capacity', choices=configs.LAYOUTS,
                 help="row layout of the sparse FFNs (DESIGN.md §4): 'capacity' is the "
                      "fast XLA layout, 'ragged' the exact one")
  p.add_argument('--capacity_factor', type=float, default=1.0,
                 help='routing.capacity_factor of the capacity layout (2.0 holds every '
                      'row 4t4i and 1t1i can ask for at a 1/2 modality share)')
  p.add_argument('--dtype', default='float32', help='compute dtype (bfloat16 on GPU/TPU)')
  p.add_argument('--variants', default=','.join(v[0] for v in VARIANTS))
  args = p.parse_args(argv)
  wanted = args.variants.split(',')
  unknown = sorted(set(wanted) - {v[0] for v in VARIANTS})
  if unknown:
    p.error(f'unknown variants {", ".join(unknown)}')
  device = jax.devices()[0]
  peak = PEAK_FLOPS.get(device.device_kind)
  base = base_config(args.size, args.seq, args.batch)
  base.routing.capacity_factor = args.capacity_factor
  print(f'# throughput: size {args.size}, {args.batch} x {args.seq} tokens per step, '
        f'{args.dtype}, layout {args.layout} (factor {args.capacity_factor}), {args.steps} timed steps after '
        f'{args.warmup}; device {device.device_kind} ({device.platform}), peak '
        f'{f"{peak / 1e12:g} TFLOP/s" if peak else "unknown"}')
  print('| variant | kernels | layers | train GFLOPs/token | tokens/s | vs dense | '
        'paper (A100) | MFU |')
  print('|---|---|---|---|---|---|---|---|')
  for kernels in args.kernels.split(','):
    dense_rate = None
    for name, ffn, experts, mod in VARIANTS:
      if name not in wanted:
        continue
      try:
        config = variant_config(base, ffn, experts, mod, kernels, args.layout, args.dtype)
      except configs.ConfigError as e:
        print(f'| {name} | {kernels} | - | - | not run: {e} | | | |', flush=True)
        continue
      rate = measure(config, args.steps, args.warmup)
      per_token = flops.train_flops(config)
      dense_rate = rate if name == 'dense' else dense_rate
      ratio = f'{rate / dense_rate:.2f}' if dense_rate else '-'
      mfu = f'{per_token * rate / peak:.1%}' if peak else 'unknown peak'
      print(f'| {name} | {kernels} | {config.model.num_layers} | {per_token / 1e9:.4g} | '
            f'{rate:,.0f} | {ratio} | {PAPER_RATIO[name]:.2f} | {mfu} |', flush=True)


if __name__ == '__main__':
  main()
