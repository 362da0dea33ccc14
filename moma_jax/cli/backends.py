"""Which JAX backends a command starts on this host.

libtpu (which the `tpu` and `test` extras install, for `moma-compile`) is found by JAX on
any Linux host, and on one with no TPU chip its start-up writes half a dozen lines of
errors to stderr ("Failed to find host bounds for accelerator type", "unexpected worker
hostname ...") before JAX falls back to the CPU: noise before a command's own output, and
no longer the one line a bad input promises. So a command that runs on this host's
devices (every one but `moma-compile`, which compiles for TPU topologies with no devices
present) starts only the CPU when the host has no TPU chip and no GPU and the user has
not chosen platforms (JAX_PLATFORMS). A GPU host is left as JAX finds it.
"""
from __future__ import annotations

import os

import jax


def _host_accelerators() -> bool | None:
  """Whether this host has a TPU chip or a GPU; None when JAX cannot say."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    tpu_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    return bool(tpu_chips or hardware_utils.has_visible_nvidia_gpu()
                or hardware_utils.num_available_amd_gpus(stop_at=1))
  except (ImportError, AttributeError, TypeError, OSError):
    return None


def skip_absent_tpu() -> None:
  """Points JAX at the CPU on a host with no accelerator, unless the user chose
  platforms. Call before anything asks JAX for devices."""
  if os.environ.get('JAX_PLATFORMS') is not None:
    return
  if _host_accelerators() is False:
    jax.config.update('jax_platforms', 'cpu')

