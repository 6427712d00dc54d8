"""What a person reads: one line per event (progress, checkpoint, sample grid, evaluation, the
summary at the end) on stderr, whatever the verbosity of the libraries' own logs."""

import logging
import sys
import time

_LOGGER = logging.getLogger('diffusion_jax')


def _setup() -> None:
  """One stderr handler of our own, not propagated to absl's root handler."""
  if not _LOGGER.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('%(asctime)s  %(message)s', datefmt='%H:%M:%S'))
    _LOGGER.addHandler(handler)
    _LOGGER.setLevel(logging.INFO)
    _LOGGER.propagate = False


def say(message: str, *args) -> None:
  """One line for a person (``message % args``)."""
  _setup()
  _LOGGER.info(message, *args)


def duration(seconds: float) -> str:
  """``1h02m``, ``5m38s``, ``12s``."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  return f'{minutes}m{seconds:02d}s' if minutes else f'{seconds}s'


class Progress:
  """``what: done/total (p%), ETA`` lines while a long job runs: at most one per ``every`` s,
  and at the end."""

  def __init__(self, what: str, total: int, *, every: float = 10.0):
    self._what, self._total, self._every = what, total, every
    self._start = self._last = time.monotonic()
    self._done = 0

  def update(self, count: int) -> None:
    """Records ``count`` more done units."""
    self._done += count
    now = time.monotonic()
    if self._done < self._total and now - self._last < self._every:
      return
    self._last = now
    elapsed = now - self._start
    if self._done >= self._total:
      say('%s: %d/%d done in %s', self._what, self._total, self._total, duration(elapsed))
    else:
      eta = elapsed / max(self._done, 1) * (self._total - self._done)
      percent = 100 * self._done / self._total
      say('%s: %d/%d (%.0f%%), ETA %s', self._what, self._done, self._total, percent, duration(eta))


class Counted:
  """A re-iterable that reports ``Progress`` (one unit per item) on every pass over ``items``."""

  def __init__(self, items, what: str, total: int):
    self._items, self._what, self._total = items, what, total

  def __iter__(self):
    progress = Progress(self._what, self._total)
    for item in self._items:
      progress.update(1)  # counted when handed out: the last line comes with the last item
      yield item
