"""Batches made and placed on the devices ahead of the step that consumes them.

  with Prefetcher(data, put, depth=2) as batches:
    batch, position = next(batches)    # waits only if the producer is behind

A background thread reads `data` (the grain pipeline's `TrainIterator`: tokenizing,
packing and VQ-coding on the host), places each batch with `put` (a host -> device
copy) and queues up to `depth` of them, so that the host's work for step s+1..s+depth
runs while the devices compute step s. Each batch comes with the iterator's position
just after it (`data.get_state()`): a checkpoint records the position of the last batch
a step consumed, not the producer's, so a resumed run reads on exactly where the saved
one stopped whatever the queue held. `depth=0` makes each batch on the caller's thread
when it is asked for (no thread, nothing ahead).

The thread makes Python and NumPy work and starts device copies; neither holds the GIL
long, and XLA computes the step on threads of its own. An error in the producer
(unreadable data) is raised by `next` in the caller, as the same exception.
"""
from __future__ import annotations

import copy
import queue
import threading
from typing import Any, Callable, Iterator

Batch = Any        # whatever `put` returns: a dict of global [B, L] arrays
Position = Any     # whatever `data.get_state()` returns (JSON-ready)

# How often a blocked producer looks whether it was told to stop (s).
_POLL = 0.05


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


class Prefetcher(Iterator):
  """(batch on the devices, data position after it), `depth` ahead of the caller."""

  def __init__(self, data: Iterator, put: Callable[[Any], Batch], depth: int):
    if depth < 0:
      raise ValueError(f'prefetch depth must be >= 0, got {depth}')
    self._data, self._put, self.depth = data, put, depth
    self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _make(self) -> tuple[Batch, Position]:
    host = next(self._data)
    # A deep copy: the iterator's state objects may change as it reads on.
    return self._put(host), copy.deepcopy(self._data.get_state())

  def _produce(self) -> None:
    while not self._stop.is_set():
      try:
        item = self._make()
      except BaseException as e:  # pylint: disable=broad-except
        item = _Failure(e)        # handed to the consumer, who raises it
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=_POLL)
          break
        except queue.Full:
          continue
      if isinstance(item, _Failure):
        return

  def __enter__(self) -> Prefetcher:
    if self.depth:
      self._thread = threading.Thread(target=self._produce, name='moma-prefetch',
                                      daemon=True)
      self._thread.start()
    return self

  def __next__(self) -> tuple[Batch, Position]:
    if self._thread is None:
      return self._make()
    item = self._queue.get()
    if isinstance(item, _Failure):
      raise item.error
    return item

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    # Drop what was made ahead: device batches nobody will consume.
    while not self._queue.empty():
      self._queue.get_nowait()
