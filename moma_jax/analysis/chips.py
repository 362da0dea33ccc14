"""Chip figures and a roofline estimate of a compiled step's time.

`CHIPS[name]`: peak dense bf16 FLOP/s, HBM bytes and bandwidth, inter-chip interconnect
bandwidth (bytes/s, both directions of all links together, as the pages give it), per
chip, each from the public page named beside it (GB = 10^9 bytes there). The HBM a
program may use is the TPU compiler's own figure instead, from its out-of-memory message
for that topology (libtpu 0.0.42.1): it decides whether a program compiles, and it is
a little above the page's capacity in GB (the pages round GiB).

`roofline(...)` is an estimate, not a measurement: a step takes at least the longest
of its compute time (compiled FLOPs / peak), its HBM time (bytes accessed / bandwidth)
and its collective time (collective bytes / interconnect bandwidth), and this takes
that lower bound as the step time (everything else overlapped, every link busy, peak
throughput in every kernel). MFU = the model's analytic training FLOPs per chip (flops.py)
/ (step time x peak). Real steps are slower; use it to compare configurations.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float        # dense bf16 FLOP/s
  hbm_bytes: float
  hbm_bandwidth: float     # bytes/s
  ici_bandwidth: float     # bytes/s, bidirectional, per chip
  source: str


GB, GIB = 1e9, 2**30
CHIPS = {
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16; HBM2e 95 GB, 2765 GBps;
    # interchip interconnect 4800 Gbps.
    # The compiler: "exceeds available HBM (95.74G)".
    'v5p': Chip('v5p', 459e12, 95.74 * GIB, 2765 * GB, 4800e9 / 8,
                'https://cloud.google.com/tpu/docs/v5p'),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16; HBM2 16 GB, 819 GBps;
    # bidirectional ICI 400 GBps per chip.
    # The compiler: "exceeds available HBM (15.75G)".
    'v5e': Chip('v5e', 197e12, 15.75 * GIB, 819 * GB, 400 * GB,
                'https://cloud.google.com/tpu/docs/v5e'),
    # https://cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16; HBM 32 GB, 1638 GBps;
    # bidirectional ICI 800 GBps per chip.
    # The compiler: "exceeds available HBM (31.25G)".
    'v6e': Chip('v6e', 918e12, 31.25 * GIB, 1638 * GB, 800 * GB,
                'https://cloud.google.com/tpu/docs/v6e'),
}
ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'trillium': 'v6e'}


def lookup(name: str | None) -> Chip | None:
  """The chip of a topology's generation ('v5p', 'v5litepod', ...), None if unknown."""
  if name is None:
    return None
  name = name.lower()
  return CHIPS.get(ALIASES.get(name, name))


def roofline(chip: Chip, *, flops: float, bytes_accessed: float, collective_bytes: float,
             model_flops: float, tokens: float) -> dict[str, float | str]:
  """The estimate for one step of one chip (module docstring).

  flops, bytes_accessed: the compiled program's (cost_analysis, per chip);
  collective_bytes: bytes its collectives produce per step, per chip;
  model_flops: analytic training FLOPs of the chip's share of the step;
  tokens: tokens the whole step trains on (all chips).
  Returns compute_s, memory_s, collective_s, step_s, bound ('compute' | 'memory' |
  'collectives'), mfu, tokens_per_sec.
  """
  times = {'compute': flops / chip.peak_flops,
           'memory': bytes_accessed / chip.hbm_bandwidth,
           'collectives': collective_bytes / chip.ici_bandwidth}
  bound = max(times, key=times.get)
  step = max(times[bound], 1e-12)
  return dict(compute_s=times['compute'], memory_s=times['memory'],
              collective_s=times['collectives'], step_s=step, bound=bound,
              mfu=model_flops / (step * chip.peak_flops), tokens_per_sec=tokens / step)
