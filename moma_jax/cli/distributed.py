"""The flags that join the processes of a multi-process job, shared by the console
scripts that run on devices (moma-train, moma-eval, moma-aux, moma-generate).

  --distributed                  jax.distributed.initialize finds the processes itself
                                 (TPU pods, SLURM, Open MPI)
  --coordinator_address=H:P      process 0's address, with --num_processes and
  --num_processes=N --process_id=I  --process_id where the cluster does not say them

`initialize()` must run before JAX touches a device.
"""
from __future__ import annotations

from absl import flags
import jax

from moma_jax.cli import command as cli

DISTRIBUTED = cli.define_once(
    flags.DEFINE_bool, 'distributed', False,
    'several processes: call jax.distributed.initialize, which finds the processes '
    'itself on TPU pods and SLURM or Open MPI clusters')
COORDINATOR = cli.define_once(
    flags.DEFINE_string, 'coordinator_address', None,
    'host:port of process 0 of a multi-process run (implies --distributed); with '
    '--num_processes and --process_id where the cluster does not say them')
NUM_PROCESSES = cli.define_once(flags.DEFINE_integer, 'num_processes', None,
                                'processes of a multi-process run')
PROCESS_ID = cli.define_once(flags.DEFINE_integer, 'process_id', None,
                             'this process, 0 .. num_processes - 1')


def initialize() -> None:
  """Joins the processes of a multi-process run (before JAX touches a device); does
  nothing without the flags above."""
  given = dict(coordinator_address=COORDINATOR.value, num_processes=NUM_PROCESSES.value,
               process_id=PROCESS_ID.value)
  if not (DISTRIBUTED.value or any(v is not None for v in given.values())):
    return
  if given['num_processes'] is not None and not 0 <= (given['process_id'] or 0) < given[
      'num_processes']:
    raise cli.UsageError(f'--process_id must be in [0, {given["num_processes"]}), got '
                         f'{given["process_id"]}')
  # CPU processes (tests, laptops) exchange through gloo; other backends ignore this.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
