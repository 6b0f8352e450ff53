"""Ctrl-C and SIGTERM: one exception that ends a run cleanly, held back while a checkpoint is written.

    signals.install()               # the CLIs, first thing: SIGINT and SIGTERM raise `Stopped`
    with signals.deferred():        # a checkpoint save: a signal here is raised when the block ends
      manager.save(...)

A run stopped by a signal (Ctrl-C, `kill`, SLURM's SIGTERM before a job's
time limit) ends with the state of its last completed checkpoint on disk:
`Stopped` derives from `KeyboardInterrupt`, so no `except Exception` (a sweep
recording a failed group) mistakes it for an error of the run, and the
`finally` blocks on its way (closing files, releasing claims and locks) run.
A signal that arrives while a checkpoint is written waits until the write is
complete, so that a stop never leaves the latest checkpoint half written.
The CLIs (`bnjax.lab.cli`) turn `Stopped` into one line and exit status
128 + the signal's number (130 for SIGINT, 143 for SIGTERM).

Signal handlers belong to the process: `install` is for programs (the CLIs),
not for libraries. Without it `deferred` changes nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)

# The process's signal state (handlers are process-wide): how deep in `deferred` blocks the main thread is, and
# the signal that arrived meanwhile.
_state = {'deferring': 0, 'pending': None}


class Stopped(KeyboardInterrupt):
  """The process received SIGINT or SIGTERM; `signum` says which."""

  def __init__(self, signum: int):
    self.signum = signum
    super().__init__(f'stopped by {signal.Signals(signum).name}')

  @property
  def exit_code(self) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (SIGINT 130, SIGTERM 143)."""
    return 128 + self.signum


def _handle(signum, frame) -> None:
  if _state['deferring']:
    _state['pending'] = _state['pending'] or signum
    return
  raise Stopped(signum)


def install() -> None:
  """Makes SIGINT and SIGTERM raise `Stopped` in the main thread (call from the main thread).

  A signal the process was started ignoring stays ignored (as Python does for SIGINT): `nohup`, or a
  shell's background job, which Ctrl-C in that shell must not stop.
  """
  for signum in HANDLED:
    if signal.getsignal(signum) is not signal.SIG_IGN:
      signal.signal(signum, _handle)


@contextlib.contextmanager
def deferred():
  """A block that a signal doesn't cut short: `Stopped` is raised when the outermost block ends.

  A stop asked for during the block wins over an error the block raised
  (the user asked to stop). Only the main thread's blocks defer (signals
  are handled there).
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  _state['deferring'] += 1
  try:
    yield
  finally:
    _state['deferring'] -= 1
    pending = _state['pending']
    if pending is not None and not _state['deferring']:
      _state['pending'] = None
      raise Stopped(pending)  # noqa: B012  (a stop replaces the block's error)
