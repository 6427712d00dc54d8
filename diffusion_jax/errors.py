"""The errors a command line reports without a traceback, and how: one paragraph on stderr
(``error: ...``) and an exit status of its own, with the traceback only if ``--debug`` or
``--verbosity=1`` asks for one.

- ``SetupError`` (exit 2): a setting the user can fix (config, workdir, data set, flags).
- ``DivergedError`` (exit 3): training diverged (non-finite loss or gradients); the last good
  checkpoint stays the latest.
"""

import sys
from typing import NoReturn

from absl import flags

EXIT_STATUS = 2  # a SetupError
DIVERGED_EXIT_STATUS = 3


class SetupError(ValueError):
  """A config, workdir or data set the run cannot use; the message says what to change."""


class DivergedError(RuntimeError):
  """The loss or the gradients stopped being finite: the run diverged. Not a setting to fix by
  reading it: a different exit status than a SetupError's, so that scripts tell them apart."""


def define_debug_flag() -> None:
  """``--debug``: re-raise these errors with their traceback instead of one paragraph."""
  flags.DEFINE_bool(
    'debug', False, 'Show the traceback of a setup error (a setting the run cannot use).'
  )


def traceback_asked() -> bool:
  """Whether the parsed command line asks for tracebacks (``--debug``, ``--verbosity`` >= 1)."""
  values = flags.FLAGS
  debug = 'debug' in values and values['debug'].value
  return bool(debug) or ('verbosity' in values and values['verbosity'].value >= 1)


def fail(message: str, status: int = EXIT_STATUS) -> NoReturn:
  """Prints ``error: <message>`` to stderr and exits with ``status``."""
  sys.stdout.flush()
  sys.stderr.write(f'error: {message}\n')
  sys.stderr.flush()
  raise SystemExit(status)


def exit_with(error: SetupError | DivergedError) -> NoReturn:
  """``error`` as one paragraph and its exit status, or re-raised if tracebacks are asked for."""
  if traceback_asked():
    raise error
  fail(str(error), DIVERGED_EXIT_STATUS if isinstance(error, DivergedError) else EXIT_STATUS)
