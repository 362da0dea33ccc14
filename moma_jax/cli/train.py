"""moma-train: train an experiment file's model, with checkpoints, metrics and evaluation.

Usage:
  moma-train --config experiments/FILE.py[:ARG] --workdir DIR [--config.a.b=VALUE ...]
  python -m moma_jax.cli.train --config experiments/quickstart.py:dense --workdir /tmp/dense

Writes into DIR: `config.json`, `metrics.jsonl` (one JSON row per logged step and per
evaluation; keys in moma_jax/training/metrics_log.py and docs/design.md §6), TensorBoard events under
`tensorboard/`, and Orbax checkpoints under `checkpoints/` (state, data position,
config). A DIR holding checkpoints resumes from the newest one and drops the metric rows
past it, so a killed run restarted with the same command continues bit-identically.
With `--config.upcycle.from_workdir=SRC --config.upcycle.at_step=N`, a new DIR starts
from step N of the 1t1i MoMa run SRC (moma_jax/training/upcycle.py): its FFNs copied into every
expert, fresh routers and optimizer, its data position and FLOPs count continued.
SIGTERM or SIGINT (Ctrl-C) saves the current step and exits 0. A non-finite loss or
gradient skips the update; `train.max_nonfinite` of them in a row stop the run (exit 1).
Bad configurations, a DIR that is a file, missing data, or an upcycling source that is
missing or does not fit end as one line, exit 2, before anything is written.

The trainer itself: moma_jax/training/trainer.py.
"""
from __future__ import annotations

import sys

from absl import flags
import ml_collections

from moma_jax.cli import command as cli
from moma_jax.cli import distributed
from moma_jax.training import trainer

PROG = trainer.PROG
cli.define_config_flag()
WORKDIR = cli.define_once(flags.DEFINE_string, 'workdir', None,
                          'directory of the run: metrics, checkpoints')
PROFILE_STEPS = cli.define_once(
    flags.DEFINE_integer, 'profile_steps', 0,
    'write a JAX profiler trace of this many steps (after the first, which compiles) '
    'into WORKDIR/profile; view it with TensorBoard or Perfetto')
USER_ERRORS = trainer.USER_ERRORS


def main(config: ml_collections.ConfigDict) -> None:
  distributed.initialize()
  try:
    if PROFILE_STEPS.value < 0:
      raise cli.UsageError(f'--profile_steps must be >= 0, got {PROFILE_STEPS.value}')
    trainer.train(config, WORKDIR.value, label=cli.config_argument(),
          profile_steps=PROFILE_STEPS.value)
  except trainer.NonFiniteError as e:
    print(f'{PROG}: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


def run(argv: list[str] | None = None) -> None:
  """Console script entry point (`moma-train`); argv[0] is the program name."""
  cli.run_main(main, argv, prog=PROG, usage=__doc__, user_errors=USER_ERRORS)


if __name__ == '__main__':
  run(sys.argv)
