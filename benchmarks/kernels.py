"""Kernel benchmark: each Pallas kernel against its XLA reference, on one routing group.

  python benchmarks/kernels.py                     # --sizes small: under a minute on a CPU
  python benchmarks/kernels.py --sizes paper       # 435M/1.4B-like layers (GPU; on a CPU
                                                   # only the XLA column, minutes)
  python benchmarks/kernels.py --dtype float32 --repeats 20

Prints one row per kernel and shape: the median time of `--repeats` jit'd calls after
`--warmup` calls (`jax.block_until_ready`) of the XLA reference and of the Pallas
kernel, their ratio (XLA / Pallas: above 1 means the kernel is faster), and on a GPU
the fraction of the device's peak — FLOP/s for the matmuls, memory bandwidth for
selection, dispatch and combine — where the device kind is in `PEAKS` ('unknown'
otherwise). 'fwd+bwd' rows time `jax.vjp` forward plus pullback.

On a CPU Pallas runs only in interpret mode, a per-program loop that says nothing about
the compiled kernel: that column is timed but labelled 'interpret', with no ratio, and
with `--sizes paper` it is not run at all. A benchmark, never a test: numbers depend on
the machine and on what else runs on it.

Axis legend: G groups, N tokens per group, E experts, K slots per expert, R rows,
C rows per expert, D embed, F hidden, T tokens, S rows per token.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import pallas_kernels as pk  # noqa: E402

# Vendor spec-sheet peaks (dense, no sparsity): bf16 and fp32 (non-tensor-core) FLOP/s,
# HBM bytes/s. Matched against `device_kind` by substring, first match wins.
PEAKS = (
    ('H200', dict(bfloat16=989e12, float32=67e12, bandwidth=4.8e12)),
    ('H100 PCIe', dict(bfloat16=756e12, float32=51e12, bandwidth=2.0e12)),
    ('H100', dict(bfloat16=989e12, float32=67e12, bandwidth=3.35e12)),
    ('A100-SXM4-80GB', dict(bfloat16=312e12, float32=19.5e12, bandwidth=2.04e12)),
    ('A100 80GB PCIe', dict(bfloat16=312e12, float32=19.5e12, bandwidth=1.94e12)),
    ('A100', dict(bfloat16=312e12, float32=19.5e12, bandwidth=1.56e12)),
)

# Per size: one routing group of N tokens, E experts each taking K = N / E tokens (MoE
# expert choice at c = 1/E, so R = N rows), D embed, F SwiGLU hidden, C = 1.25 R / E rows
# per expert in the capacity layout. 'paper': a 435M-like layer (D 1024, ffn 4096 ->
# F 2731) on a routing group of 8 sequences of 4096 tokens.
SIZES = {
    'small': [dict(g=1, n=512, e=8, d=128, f=256), dict(g=2, n=1024, e=4, d=64, f=128)],
    'paper': [dict(g=1, n=32768, e=8, d=1024, f=2731), dict(g=1, n=8192, e=8, d=2048,
                                                            f=5461)],
}


def peak_of(kind: str):
  for key, peak in PEAKS:
    if key in kind:
      return peak
  return None


def timed(fn, args, warmup: int, repeats: int) -> float:
  """Median seconds of fn(*args) (jit'd) after `warmup` calls."""
  fn = jax.jit(fn)
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def with_backward(f):
  """fn(*args) -> (f's output, the pullback of a ones cotangent), for fwd+bwd timing."""
  def run(*args):
    y, pull = jax.vjp(f, *args)
    return y, pull(jnp.ones_like(y))
  return run


def cases(shape, dtype):
  """(kernel name, shape text, xla fn, pallas fn, args, FLOPs, bytes) for one size."""
  g, n, e, d, f = shape['g'], shape['n'], shape['e'], shape['d'], shape['f']
  k = n // e
  rng = np.random.default_rng(0)
  item = jnp.dtype(dtype).itemsize
  scores = jnp.asarray(rng.random((g, n, e)), jnp.float32)
  eligible = jnp.asarray(rng.random((g, n, 1)) < 0.9)
  # The routing plan of group 0, expert-major: R = E * K rows, S = E rows per token.
  idx, gate = pk.expert_choice_reference(scores[:1], eligible[:1], k)
  token_index, weight = idx[0].reshape(-1), gate[0].reshape(-1)
  r, t = token_index.shape[0], n
  group_sizes = jnp.full((e,), k, jnp.int32)
  x = jnp.asarray(rng.normal(size=(t, d)), dtype)
  rows = jnp.asarray(rng.normal(size=(r, d)), dtype)
  c = -(-5 * r // (4 * e))
  blocks = jnp.asarray(rng.normal(size=(e, c, d)), dtype)
  w = tuple(jnp.asarray(rng.normal(size=s) * 0.02, dtype)
            for s in ((e, d, f), (e, d, f), (e, f, d)))
  ffn_flops = lambda m: 2 * m * d * f * 3
  out = []
  out.append(('selection', f'G{g} N{n} E{e} K{k}',
              lambda s, el: pk.references.expert_choice_reference(s, el, k),
              lambda s, el: pk.expert_choice(s, el, k, impl='pallas'), (scores, eligible),
              None,
              g * n * e * 4 + g * n + g * e * k * 8))
  out.append(('dispatch', f'T{t} R{r} D{d}',
              lambda x: pk.gather_rows(x, token_index, impl='xla'),
              lambda x: pk.gather_rows(x, token_index, impl='pallas'), (x,), None,
              2 * r * d * item + r * 4))
  out.append(('combine', f'R{r} T{t} D{d} S{e}',
              lambda o, wt: pk.combine_rows(o, wt, token_index, t, e, impl='xla'),
              lambda o, wt: pk.combine_rows(o, wt, token_index, t, e, impl='pallas'),
              (rows, weight), None, r * d * item + t * d * item + r * 8 + t * e * 4))
  ragged_x = lambda x, *w: pk.swiglu_ragged(x, group_sizes, *w, impl='xla')
  # On TPU the ragged kernel is megablox's gmm (see grouped_matmul.py).
  ragged_impl = 'megablox' if jax.default_backend() == 'tpu' else 'pallas'
  ragged_p = lambda x, *w: pk.swiglu_ragged(x, group_sizes, *w, impl=ragged_impl)
  cap_x = lambda x, *w: pk.swiglu_capacity(x, *w, impl='xla')
  cap_p = lambda x, *w: pk.swiglu_capacity(x, *w, impl='pallas')
  out.append(('swiglu_ragged', f'R{r} D{d} F{f} E{e}', ragged_x, ragged_p, (rows, *w),
              ffn_flops(r), None))
  out.append(('swiglu_ragged fwd+bwd', f'R{r} D{d} F{f} E{e}', with_backward(ragged_x),
              with_backward(ragged_p), (rows, *w), 3 * ffn_flops(r), None))
  out.append(('swiglu_capacity', f'E{e} C{c} D{d} F{f}', cap_x, cap_p, (blocks, *w),
              ffn_flops(e * c), None))
  out.append(('swiglu_capacity fwd+bwd', f'E{e} C{c} D{d} F{f}', with_backward(cap_x),
              with_backward(cap_p), (blocks, *w), 3 * ffn_flops(e * c), None))
  return out


def fmt_time(seconds: float) -> str:
  return f'{seconds * 1e3:.3f} ms'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', choices=sorted(SIZES), default='small')
  parser.add_argument('--dtype', choices=('bfloat16', 'float32'), default='bfloat16')
  parser.add_argument('--warmup', type=int, default=None, help='default 2 (1 on a CPU '
                      'with --sizes paper)')
  parser.add_argument('--repeats', type=int, default=None, help='default 5 (1 on a CPU '
                      'with --sizes paper)')
  args = parser.parse_args(argv)
  slow = jax.default_backend() == 'cpu' and args.sizes == 'paper'
  args.warmup = (1 if slow else 2) if args.warmup is None else args.warmup
  args.repeats = (1 if slow else 5) if args.repeats is None else args.repeats

  dtype = jnp.dtype(args.dtype)
  device = jax.devices()[0]
  on_cpu = jax.default_backend() == 'cpu'
  peak = None if on_cpu else peak_of(device.device_kind)
  print(f'device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, '
        f'dtype {args.dtype}, sizes {args.sizes}, median of {args.repeats} after '
        f'{args.warmup} warm-up')
  if on_cpu:
    print('Pallas runs in interpret mode on a CPU: its times are not kernel times.')
  header = ('kernel', 'shape', 'XLA', 'Pallas', 'XLA/Pallas', 'Pallas % of peak')
  widths = (24, 26, 14, 22, 10, 18)
  line = lambda cells: '  '.join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
  print(line(header))
  print(line(['-' * w for w in widths]))
  for shape in SIZES[args.sizes]:
    for name, text, xla_fn, pallas_fn, fn_args, flop, nbytes in cases(shape, dtype):
      xla_s = timed(xla_fn, fn_args, args.warmup, args.repeats)
      if on_cpu and args.sizes != 'small':
        print(line((name, text, fmt_time(xla_s), 'not run (interpret)', '-', '-')))
        continue
      pallas_s = timed(pallas_fn, fn_args, 1 if on_cpu else args.warmup,
                       min(args.repeats, 3) if on_cpu else args.repeats)
      if on_cpu:
        print(line((name, text, fmt_time(xla_s), f'{fmt_time(pallas_s)} interpret', '-',
                    '-')))
        continue
      if peak is None:
        frac = 'unknown'
      elif flop is not None:
        frac = f'{100 * flop / pallas_s / peak[args.dtype]:.1f}% FLOP/s'
      else:
        frac = f'{100 * nbytes / pallas_s / peak["bandwidth"]:.1f}% HBM'
      print(line((name, text, fmt_time(xla_s), fmt_time(pallas_s),
                  f'{xla_s / pallas_s:.2f}', frac)))


if __name__ == '__main__':
  main()
