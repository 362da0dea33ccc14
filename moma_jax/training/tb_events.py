"""TensorBoard scalars written in the caller's thread, so that a failed write is raised.

  events = EventFile(logdir, purge_step=None)
  events.add_scalars(step, {'loss': 2.31, 'lr': 1e-4})
  events.flush()       # on disk (fsync): where NFS may report a full disk
  events.close()

tensorboardX's SummaryWriter writes from a thread of its own. On a write error (a full
disk) that thread dies with a traceback on stderr and nothing else notices: its queue
(10 events) fills and the next `add_scalar` blocks forever, and so does `close()`. Here
the events go through tensorboardX's own synchronous `EventsWriter` (the writer that
thread drives) in the caller's thread, so an error raises there (MetricsLog says it as
a `run_dir.StorageError`). One event per `add_scalars`, in a new
`events.out.tfevents.*` file per writer (never one of an earlier writer, which
tensorboardX would truncate when two start within the same second).
"""
from __future__ import annotations

import os
import time
from typing import Mapping

from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2

# How often the events are flushed and synced to the disk without being asked
# (SummaryWriter's writer thread does it every 120 s).
SYNC_SECS = 60


class EventFile:
  """One TensorBoard event file of scalars."""

  def __init__(self, logdir: str, *, purge_step: int | None = None):
    """purge_step: TensorBoard hides the events of earlier files at or past this step
    (a resumed run's abandoned steps)."""
    os.makedirs(logdir, exist_ok=True)
    before = set(os.listdir(logdir))
    # The process id and a counter keep two writers of one second apart.
    suffix, n = f'.{os.getpid()}', 0
    while any(name.endswith(suffix) for name in before):
      n += 1
      suffix = f'.{os.getpid()}.{n}'
    self._writer = EventsWriter(os.path.join(logdir, 'events'), filename_suffix=suffix)
    self.path = logdir              # what a write error names
    self._flushed = time.monotonic()
    if purge_step is not None:
      self._writer.write_event(event_pb2.Event(
          step=purge_step, wall_time=time.time(),
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def add_scalars(self, step: int, values: Mapping[str, float]) -> None:
    """One event holding every value of `values` at `step`."""
    summary = summary_pb2.Summary()
    for key, value in values.items():
      summary.value.extend(tb_summary.scalar(key, value).value)
    self._writer.write_event(event_pb2.Event(step=int(step), wall_time=time.time(),
                                             summary=summary))
    if time.monotonic() - self._flushed > SYNC_SECS:
      self.flush()

  def flush(self) -> None:
    self._writer.flush()            # flush and fsync
    self._flushed = time.monotonic()

  def close(self) -> None:
    """Flushes (with an fsync) and closes."""
    self._writer.close()            # flush, fsync, close
