"""Does the trainer overlap the host's batches with the devices' steps? Three rates.

  python benchmarks/input_overlap.py                      # about 3 minutes on 2 CPU cores
  python benchmarks/input_overlap.py --prefetch 0         # the loop without prefetching

One model, one batch size, seq 4096, the quickstart's data mixture (the embedded
datasets, built into --data_dir on first use, VQ tokenization included). It measures:
  host only    the real pipeline making batches and placing them on the device
               (`pipeline.train_iterator` + `sharding.global_batch`), nothing else;
  step only    the jit'd training step (`step.make_train_step`, the trainer's) on one
               batch already on the device, step after step;
  loop         `trainer.train` itself, real pipeline, prefetch, checkpoints and
               evaluation off the timed steps; its rate is the training tokens between
               two steps' `on_step` calls divided by the wall time between them.
All three count B x L tokens per step (padding included). A loop that runs host and
device work in turn reaches 1 / (1/host + 1/step); one that overlaps them reaches the
slower of the two. The table prints both bounds and the loop's share of the second.

The default model is the cheapest step found here at seq 4096 (MoMa 4t4i with
mixture-of-depths, one layer, d 16, a MoD layer running 1/16 of the tokens): on one CPU
core it still costs several times what making its batch costs the host, since every
step over 4096-token rows is far dearer on a CPU core than on an accelerator. So the
question the table answers is whether the host's time disappears from the loop's (the
loop at the step's rate, not at the in-turn bound). On a CPU the "device" is the
same machine: XLA's compute threads are held to one core here (started under that
core's affinity; XLA's own flags leave its thread pool on both: 1.7 cores busy in the
step alone) and the host's BLAS to one thread (`OPENBLAS_NUM_THREADS=1`: with two, its
spinning helpers took the device's core and the loop's steps 480 ms instead of 300), so
that the host's producer has the other core. On an accelerator the device computes
apart and the question is only whether the host keeps up. A benchmark, never a test.
"""
from __future__ import annotations

import os

# Before NumPy starts: the host's BLAS (the VQ tokenizer's nearest-code search) on one
# thread, or its spinning helper threads take the device's core.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def _device_on_one_core() -> set[int]:
  """Starts JAX's CPU backend with this thread held to one core, so that the threads
  XLA makes for computing inherit that core alone; then gives this thread (and the
  producer thread it will start) every core back. Returns the device's core."""
  cores = os.sched_getaffinity(0)
  device_core = {min(cores)}
  os.sched_setaffinity(0, device_core)
  try:
    jax.block_until_ready(jnp.ones(8) + 1)        # the backend and its thread pools
  finally:
    os.sched_setaffinity(0, cores)
  return device_core

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)

from moma_jax import configs  # noqa: E402
from moma_jax.data import pipeline  # noqa: E402
from moma_jax.model import sharding  # noqa: E402
from moma_jax.model import transformer  # noqa: E402
from moma_jax.training import optimizer as optimizer_lib  # noqa: E402
from moma_jax.runs import state as train_state  # noqa: E402
from moma_jax.training import step as train_step  # noqa: E402
from moma_jax.training import trainer  # noqa: E402


def make_config(args):
  spec = importlib.util.spec_from_file_location(
      'quickstart', os.path.join(ROOT, 'experiments', 'quickstart.py'))
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)
  c = quickstart.get_config(args.variant)
  m = c.model
  m.d_model, m.num_layers, m.ffn_dim, m.num_heads = args.d_model, args.layers, \
      4 * args.d_model, 2
  m.max_len = c.data.seq_len = args.seq
  if m.mod.enabled:
    m.mod.capacity = args.mod_capacity
  c.data.data_dir = args.data_dir
  c.routing.group_size = 1
  t = c.train
  t.batch_size, t.steps, t.prefetch = args.batch, args.warmup + args.steps + 1, args.prefetch
  t.log_every = t.eval_every = t.ckpt_every = t.steps   # nothing but steps in between
  t.eval_max_batches = 1
  return configs.validate(c)


def host_only(config, tok, n: int) -> float:
  """Seconds per batch made by the real pipeline and placed on the device."""
  data = pipeline.train_iterator(config, tok)
  batch_sh = sharding.batch_sharding(sharding.one_device_mesh())
  jax.block_until_ready(sharding.global_batch(next(data), batch_sh))
  start = time.perf_counter()
  for _ in range(n):
    batch = sharding.global_batch(next(data), batch_sh)
  jax.block_until_ready(batch)
  return (time.perf_counter() - start) / n


def step_only(config, tok, warmup: int, n: int) -> float:
  """Seconds per training step on a batch already on the device."""
  mesh = sharding.one_device_mesh()
  model, tx = transformer.build(config), optimizer_lib.optimizer(config)
  state_formats = train_state.formats(train_state.layout(model, tx, mesh)[0])
  state = train_state.create(model, tx, state_formats, config.train.seed)
  batch_sh = sharding.batch_sharding(mesh)
  batch = sharding.global_batch(next(pipeline.train_iterator(config, tok)), batch_sh)
  one = jnp.float32(1)
  with jax.set_mesh(mesh), sharding.axis_rules():
    step = train_step.make_train_step(model, tx, config, (state_formats, batch_sh))
    for i in range(warmup):
      state, metrics = step(state, batch, jnp.int32(i + 1), one)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(n):
      state, metrics = step(state, batch, jnp.int32(warmup + i + 1), one)
    jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / n


def loop(config, warmup: int, n: int) -> float:
  """Seconds per step of `trainer.train`, between steps warmup and warmup + n."""
  stamps = {}
  with tempfile.TemporaryDirectory() as workdir:
    trainer.train(config, workdir,
                  on_step=lambda step: stamps.setdefault(step, time.perf_counter()))
  return (stamps[warmup + n] - stamps[warmup]) / n


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--variant', default='mod_moma_4t4i',
                 help='a quickstart variant (experiments/quickstart.py)')
  p.add_argument('--d_model', type=int, default=16)
  p.add_argument('--layers', type=int, default=1)
  p.add_argument('--mod_capacity', type=float, default=0.0625,
                 help='model.mod.capacity of a MoD variant: the share of tokens a MoD '
                      'layer runs (its attention costs the square of it)')
  p.add_argument('--seq', type=int, default=4096)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--prefetch', type=int, default=2, help='train.prefetch of the loop')
  p.add_argument('--steps', type=int, default=12, help='timed steps of each measurement')
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--repeats', type=int, default=3, help='median of this many rounds')
  p.add_argument('--data_dir', default=os.path.expanduser(pipeline.DEFAULT_DATA_DIR))
  args = p.parse_args(argv)
  device_core = _device_on_one_core()
  config = make_config(args)
  tok = pipeline.load_tokenizers(config)
  tokens = config.train.batch_size * config.data.seq_len
  print(f'# input overlap: {args.variant}, {args.layers} layer(s), d {args.d_model}, '
        f'{args.batch} x {args.seq} = {tokens} tokens per step, prefetch {args.prefetch}; '
        f'median of {args.repeats} rounds of {args.steps} steps; device '
        f'{jax.devices()[0].device_kind} computing on core {min(device_core)} of '
        f'{os.cpu_count()}, OPENBLAS_NUM_THREADS={os.environ["OPENBLAS_NUM_THREADS"]}',
        flush=True)
  times = {'host': [], 'step': [], 'loop': []}
  for _ in range(args.repeats):      # interleaved: a change in load hits all three
    times['host'].append(host_only(config, tok, args.steps))
    times['step'].append(step_only(config, tok, args.warmup, args.steps))
    times['loop'].append(loop(config, args.warmup, args.steps))
  rate = {k: tokens / statistics.median(v) for k, v in times.items()}
  serial = 1 / (1 / rate['host'] + 1 / rate['step'])
  slower = min(rate['host'], rate['step'])
  print('| measured | tokens/s | ms per step |')
  print('|---|---:|---:|')
  for name, label in (('host', 'host only (pipeline + placement)'),
                      ('step', 'step only (device)'), ('loop', 'trainer loop')):
    print(f'| {label} | {rate[name]:,.0f} | {1e3 * tokens / rate[name]:.1f} |')
  print(f'| bound: host and step in turn | {serial:,.0f} | {1e3 * tokens / serial:.1f} |')
  print(f'| bound: overlapped (the slower) | {slower:,.0f} | {1e3 * tokens / slower:.1f} |')
  print(f'loop / slower of host and step: {rate["loop"] / slower:.1%}; loop / in-turn '
        f'bound: {rate["loop"] / serial:.2f}x', flush=True)


if __name__ == '__main__':
  main()
