"""moma-flops: parameters and FLOPs per token of an experiment config.

Usage:
  moma-flops --config FILE[:ARG] [--json] [--config.a.b=value ...]
  python -m moma_jax.cli.flops --config experiments/paper_table1.py:moma_4t4i_435m

Prints total and active parameters (millions), forward and training FLOPs per token per
modality and overall, and the same numbers for the compute-matched dense model (same
width, nearest forward FLOPs per token). Counting convention: moma_jax/analysis/flops.py.
With --json, one JSON object: {'config', 'model', 'dense', 'forward_ratio'}, 'model'
and 'dense' being `flops.FlopsReport.to_dict()` (raw counts, not millions).
"""
from __future__ import annotations

import json
import sys
from typing import Sequence

from absl import flags
import ml_collections

from moma_jax.analysis import flops
from moma_jax.cli import command as cli
from moma_jax import configs

PROG = 'moma-flops'
CONFIG = cli.define_config_flag()
JSON = cli.define_once(flags.DEFINE_bool, 'json', False,
                       'print one JSON object instead of a table')


def describe(config: ml_collections.ConfigDict) -> str:
  """One line naming the architecture, e.g. 'moma (4, 4), 24 layers (12 MoD), d 1024'."""
  m = config.model
  ffn = configs.ffn_label(m)
  layers = flops.count(config).num_mod_layers
  mod = f' ({layers} MoD, c_d {m.mod.capacity})' if layers else ''
  return (f'{ffn}, {m.num_layers} layers{mod}, d_model {m.d_model}, {m.num_heads} heads, '
          f'ffn {m.ffn_dim}, vocab {m.vocab_size}, seq {config.data.seq_len}')


def _table(report: flops.FlopsReport, names: Sequence[str]) -> list[str]:
  """Rows of one model: parameters in millions, FLOPs per token in GFLOPs (5 digits)."""
  cols = ['overall', *names]
  row = lambda label, values, fmt: f'  {label:<26}' + ''.join(
      f'{fmt.format(values[c]):>12}' for c in cols)
  return [
      f'  {"":<26}' + ''.join(f'{c:>12}' for c in cols),
      f'  {"params total (M)":<26}{report.params_total / 1e6:>12.5g}',
      row('params active (M)', {k: v / 1e6 for k, v in report.params_active.items()}, '{:.5g}'),
      row('forward GFLOPs/token', {k: v / 1e9 for k, v in report.forward.items()}, '{:.5g}'),
      row('training GFLOPs/token', {k: v / 1e9 for k, v in report.train.items()}, '{:.5g}'),
  ]


def main(config: ml_collections.ConfigDict) -> None:
  report = flops.count(config)
  dense_config = flops.compute_matched_dense(config)
  dense = flops.count(dense_config)
  ratio = report.forward['overall'] / dense.forward['overall']
  if JSON.value:
    print(json.dumps(dict(config=cli.config_argument(), model=report.to_dict(),
                          dense=dense.to_dict(), forward_ratio=ratio), indent=1))
    return
  names = tuple(config.model.modalities)
  lines = [f'{cli.config_argument()}: {describe(config)}', *_table(report, names), '',
           f'compute-matched dense: {describe(dense_config)}', *_table(dense, names),
           f'  forward FLOPs ratio model / dense: {ratio:.4f}']
  print('\n'.join(lines))


def run(argv: Sequence[str] | None = None) -> None:
  """Console script entry point (`moma-flops`); argv[0] is the program name."""
  cli.run_main(main, argv, prog=PROG, usage=__doc__)


if __name__ == '__main__':
  run(sys.argv)
