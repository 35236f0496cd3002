"""Host-to-device prefetching: move the next batches to the devices while the current step runs."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator

_POLL_S = 0.05  # how often a producer blocked on a full queue checks whether to stop


class _End:
  pass


class _Raised:

  def __init__(self, error: BaseException):
    self.error = error


def prefetch(iterator: Iterable, size: int, put: Callable[[Any], Any] | None = None) -> Iterator:
  """Yields ``put(item)`` for each item of ``iterator``, in order, computed ahead on a background
  thread that keeps up to ``size`` results ready.

  ``put`` is typically the host-to-device transfer, e.g.
  ``lambda b: parallel.host_to_global(b, mesh)`` (``jax.make_array_from_process_local_data``) or
  ``functools.partial(jax.device_put, device=sharding)``; by default items pass through unchanged.

  * An exception raised by ``iterator`` or ``put`` is re-raised to the consumer when it reaches that
    position (the items before it are delivered first).
  * When the consumer stops early (``close()``, ``break`` out of a for loop, or the generator being
    garbage collected), the thread is told to stop and joined, and ``iterator`` is closed if it has
    a ``close`` method; no thread is left behind.
  * The thread starts on the first ``next()``.
  """
  if int(size) < 1:
    raise ValueError(f'prefetch size must be >= 1, got {size}.')
  return _prefetch(iter(iterator), int(size), put if put is not None else (lambda x: x))


def _prefetch(source: Iterator, size: int, put: Callable[[Any], Any]) -> Iterator:
  ready: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def offer(item) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=_POLL_S)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in source:
        if stop.is_set() or not offer(put(item)):
          return
      offer(_End)
    except BaseException as e:  # pylint: disable=broad-except  (handed to the consumer)
      offer(_Raised(e))

  thread = threading.Thread(target=produce, name='prefetch', daemon=True)
  thread.start()
  try:
    while True:
      item = ready.get()
      if item is _End:
        return
      if isinstance(item, _Raised):
        raise item.error
      yield item
  finally:
    stop.set()
    thread.join()
    close = getattr(source, 'close', None)
    if close is not None:
      close()
