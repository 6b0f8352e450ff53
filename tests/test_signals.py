"""bnjax.lab.signals: SIGINT/SIGTERM as `Stopped`, held back while a checkpoint is written."""

import signal

import pytest

from bnjax.lab import signals


@pytest.fixture
def installed():
  before = {signum: signal.getsignal(signum) for signum in signals.HANDLED}
  signal.signal(signal.SIGINT, signal.default_int_handler)  # (as in a terminal, whatever the runner was given)
  signals.install()
  yield
  for signum, handler in before.items():
    signal.signal(signum, handler)


def test_a_signal_raises_stopped_with_the_shells_exit_code(installed):
  with pytest.raises(signals.Stopped, match='stopped by SIGINT') as stop:
    signal.raise_signal(signal.SIGINT)
  assert stop.value.exit_code == 130 and isinstance(stop.value, KeyboardInterrupt)
  with pytest.raises(signals.Stopped, match='stopped by SIGTERM') as stop:
    signal.raise_signal(signal.SIGTERM)
  assert stop.value.exit_code == 143


def test_a_signal_during_a_deferred_block_waits_for_its_end(installed):
  done = []
  with pytest.raises(signals.Stopped, match='SIGTERM'):
    with signals.deferred():
      with signals.deferred():  # nested: only the outermost block's end raises
        signal.raise_signal(signal.SIGTERM)
        done.append('inner')
      done.append('outer')
  assert done == ['inner', 'outer']
  with signals.deferred():  # the stop was delivered once
    done.append('next')
  # A stop asked for while the block fails wins over the block's error (the user asked to stop).
  with pytest.raises(signals.Stopped):
    with signals.deferred():
      signal.raise_signal(signal.SIGINT)
      raise OSError(28, 'No space left on device')


def test_a_signal_ignored_at_start_stays_ignored():
  before = {signum: signal.getsignal(signum) for signum in signals.HANDLED}
  try:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # nohup, a shell's background job
    signals.install()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    for signum, handler in before.items():
      signal.signal(signum, handler)
