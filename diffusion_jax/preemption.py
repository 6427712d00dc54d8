"""Preemption notices (SIGTERM: a spot or queued TPU about to be taken back, ``launch/tpu.sh
stop``), noticed wherever a run can spend minutes: between host calls of the train loop, after
compiling, between chunks of samples and batches of the bound. The work stops at the next of
those points, every host at the same one; the train loop then saves its state and exits 0.

  with preemption.watching():   # main, and the train loop (nested: one watcher)
    ...
    preemption.check()           # at a chunk boundary: raises Preempted after a notice

One process: a Python SIGTERM handler sets a flag. Several processes (``jax.distributed``): JAX's
own notifier, installed by ``jax.distributed.initialize()``, catches the signal on whichever host
gets it, and ``reached_preemption_sync_point`` turns True on every host at the same sync id; no
Python handler may replace it. So every process must ask the same number of times: the chunk
loops ask once per chunk, the same chunks on every host.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):  # noqa: N818  (a notice received, not a failure)
  """A preemption notice stopped the work at a chunk boundary."""


class Notice:
  """The notice of this process: ``stop_requested`` is True once, on every host at the same
  call, after a SIGTERM reached any of them."""

  def __init__(self):
    self._multi_process = jax.process_count() > 1
    self._received = threading.Event()
    self._previous = None
    self._sync_id = 0
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._received.set())

  def stop_requested(self) -> bool:
    self._sync_id += 1
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(self._sync_id)
    return self._received.is_set()

  def release(self) -> None:
    """Gives SIGTERM back to the handler before this one."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


_notice: Notice | None = None


@contextlib.contextmanager
def watching() -> Iterator[Notice]:
  """Notices preemption inside the block (the outermost block installs the watcher)."""
  global _notice
  if _notice is not None:
    yield _notice
    return
  _notice = Notice()
  try:
    yield _notice
  finally:
    _notice.release()
    _notice = None


def stop_requested() -> bool:
  """Whether a notice came (False outside ``watching``); every host must ask alike."""
  return _notice is not None and _notice.stop_requested()


def check() -> None:
  """Raises Preempted if a notice came: call it at chunk boundaries, on every host alike."""
  if stop_requested():
    raise Preempted
