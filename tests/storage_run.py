"""A tiny 'training run' at the level of Checkpoints and MetricsLog, for storage tests.

  python tests/storage_run.py WORKDIR STEPS [--fsize_limit BYTES]

Steps 1..STEPS update a small state deterministically (a pytree of jax arrays, ~2 MiB),
write a metrics row each step and save a checkpoint every 10 steps; a WORKDIR holding
checkpoints resumes from the newest one, as the trainer does. It runs under
`command.run_main`, so its errors end as the commands' do (one line, exit code 2), and
closes its checkpoints and metrics in a `finally`, as the trainer does. At the end it
prints the step and a checksum of the state on stdout.

--fsize_limit: the file size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) in bytes: a real
write failure (EFBIG) wherever a file grows past it, no root or mount needed.
"""
import argparse
import hashlib
import json
import resource
import signal
import sys

import jax.numpy as jnp
import numpy as np

from moma_jax.cli import command
from moma_jax.runs import checkpoint as ckpt_lib
from moma_jax.training import metrics_log

SIZE = 1 << 19     # float32 values of the state's big array: 2 MiB


def update(state, step):
  """The 'training step': deterministic in (state, step)."""
  noise = np.random.default_rng(step).standard_normal(SIZE, dtype=np.float32)
  return {'w': state['w'] * 0.5 + jnp.asarray(noise), 'b': state['b'] + step}


def main(workdir, steps):
  ckpts = ckpt_lib.Checkpoints(workdir)
  state = {'w': jnp.zeros(SIZE, jnp.float32), 'b': jnp.zeros(3, jnp.float32)}
  restored = ckpts.restore_latest(state)
  start = 0
  if restored is not None:
    start, state, _ = restored
  log = metrics_log.MetricsLog(workdir, resume_step=start, total_steps=steps,
                               last_good=ckpts.last_good)
  try:
    for step in range(start + 1, steps + 1):
      state = update(state, step)
      log.write(step, {'loss': float(jnp.mean(state['w'] ** 2)), 'b': state['b'][0]})
      if step % 10 == 0:
        ckpts.save(step, state, {'step': step}, {'size': SIZE})
  finally:
    ckpts.close()
    log.close()
  digest = hashlib.sha256(np.asarray(state['w']).tobytes()).hexdigest()
  print(json.dumps({'step': steps, 'w': digest, 'b': np.asarray(state['b']).tolist()}))


if __name__ == '__main__':
  parser = argparse.ArgumentParser()
  parser.add_argument('workdir')
  parser.add_argument('steps', type=int)
  parser.add_argument('--fsize_limit', type=int)
  args = parser.parse_args()
  if args.fsize_limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE,
                       (args.fsize_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  command.run_main(lambda: main(args.workdir, args.steps), [sys.argv[0]],
                   prog='storage-run', with_config=False)
