"""What every CLI of the lab shares: flags from the option table, and user errors as one line.

    define_option_flags(lists=False)     # --batch_size=500 ... (one typed flag per option)
    define_option_flags(lists=True)      # --batch_size=32,500 ... (values of a grid)
    run(main)                            # flags parsed; user errors -> one line 'error: ...', exit 2 or 1

Every option of `bnjax.lab.options.OPTIONS` becomes a flag of the same name,
with its help text, default and choices: adding an option adds its flag.
"""

from __future__ import annotations

import errno
import functools
import signal
import sys
from typing import Any, Callable

from absl import flags

from bnjax.lab import config as config_lib
from bnjax.lab import host, signals
from bnjax.lab.options import OPTIONS

FLAGS = flags.FLAGS
EXIT_USAGE = 2
EXIT_FAILURE = 1


def define_option_flags(*, lists: bool) -> None:
  """One flag per option, defaulting to 'unset' (None): typed (`lists=False`) or comma-separated values."""
  for option in OPTIONS.values():
    help_text = f'{option.help} (default: {option.default!r})'
    if lists:
      flags.DEFINE_string(option.name, None, f'Comma-separated values: {help_text}')
    elif option.choices is not None:
      flags.DEFINE_enum(option.name, None, [str(c) for c in option.allowed()], help_text)
    elif option.type is bool:
      flags.DEFINE_bool(option.name, None, help_text)
    else:
      # Parsed by config.parse_value: the same types and messages as the sweep's comma lists.
      flags.DEFINE_string(option.name, None, help_text)
  flags.DEFINE_bool('verbose', False, 'Show the traceback of an error (users get one line without it).')


def given_options(*, lists: bool) -> dict[str, Any]:
  """`{name: value}` (or `{name: [values]}` with `lists`) of the option flags given on the command line."""
  given = {}
  for name in config_lib.FIELDS:
    if not FLAGS[name].present:
      continue
    value = FLAGS[name].value
    if lists:
      given[name] = config_lib.parse_values(name, value)
    elif isinstance(value, str) and OPTIONS[name].type is not str:
      given[name] = config_lib.parse_value(name, value)
    else:
      given[name] = value
  return given


def _message(error: BaseException) -> tuple[str, int]:
  """The one line and exit code for an error a user can fix."""
  from bnjax.lab.rundir import RunDirError

  if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or 'No space left on device' in str(error):
    where = f' writing {error.filename}' if getattr(error, 'filename', None) else ''
    detail = f' ({error.strerror})' if getattr(error, 'strerror', None) else ''
    return f'the disk is full{where}{detail}: free some space or choose another --workdir.', EXIT_FAILURE
  if isinstance(error, PermissionError):
    return f'permission denied: {error.filename or error}: check the file or folder\'s permissions.', EXIT_FAILURE
  if isinstance(error, RunDirError):
    return str(error), EXIT_USAGE
  if isinstance(error, ValueError):
    return str(error), EXIT_USAGE
  if isinstance(error, OSError):
    return f'{error.strerror or error}: {error.filename or ""}'.rstrip(': '), EXIT_FAILURE
  return f'{type(error).__name__}: {error}', EXIT_FAILURE


USER_ERRORS = (ValueError, OSError)


def one_line_errors(main: Callable, on_stop: str = 'the last checkpoint is kept') -> Callable:
  """Wraps an absl `main`: user errors (ValueError incl. data and run-folder errors, OSError) end as
  `error: <one line>` on stderr with exit 2 (usage) or 1; `--verbose` shows the traceback.

  A stop (Ctrl-C, SIGTERM: `bnjax.lab.signals`) ends as `stopped by SIGINT: <on_stop>` on stderr with
  exit 128 + the signal's number (130, 143)."""

  @functools.wraps(main)
  def wrapped(argv):
    from absl import logging

    logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.WARNING)  # Orbax logs every save at INFO
    try:
      return main(argv)
    except KeyboardInterrupt as stop:
      if FLAGS.verbose:
        raise
      stop = stop if isinstance(stop, signals.Stopped) else signals.Stopped(signal.SIGINT)
      print(f'{stop}: {on_stop}', file=sys.stderr)
      return stop.exit_code
    except USER_ERRORS as error:
      if FLAGS.verbose:
        raise
      text, code = _message(error)
      print(f'error: {" ".join(text.split())}', file=sys.stderr)
      return code

  return wrapped


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad or unknown flag as one line and exit 2 (no help text)."""
  try:
    return FLAGS(argv)
  except flags.Error as error:
    print(f'error: {" ".join(str(error).split())} (--helpfull lists the flags)', file=sys.stderr)
    sys.exit(EXIT_USAGE)


flags.DEFINE_enum('host_allocator', 'retain', host.HOST_ALLOCATORS,
                  "Host memory: 'retain' makes glibc keep freed memory for reuse (XLA:CPU's per-step temporaries "
                  "are then not page-faulted in every step: 0.79x the CNN's step time on CPU; the process keeps its "
                  "peak memory); 'glibc': its defaults. Applied before JAX starts; numbers are the same either way.")
flags.DEFINE_string('cpu_devices', None,
                    "The CPU as this many JAX devices ('auto': one per core). Training is then data-parallel over "
                    "them, BN statistics synchronized (--num_devices, --cross_device_stats): 0.74x the CIFAR CNN's "
                    "step time on 2 cores. Numbers then differ from one device's in the last digits (the order of "
                    "the sums), and dropout draws its masks per device. Sweeps put their lanes on the devices. "
                    "Unset: JAX's default (one device, or XLA_FLAGS' --xla_force_host_platform_device_count).")


flags.DEFINE_float('coordinator_timeout', 120.0,
                   'Multi-process: seconds to wait for every process to reach the coordinator '
                   '(--coordinator_address) before giving up with a message.')


def run(main: Callable, on_stop: str = 'the last checkpoint is kept') -> None:
  """`absl.app.run` of `main` with one-line errors for flags (`parse_flags`) and for what `main` raises;
  `--host_allocator` and `--cpu_devices` are applied before `main` (and so before JAX starts).

  SIGINT and SIGTERM end `main` with one line (`stopped by SIGTERM: <on_stop>`) and exit 130 / 143.
  """
  from absl import app

  def with_host_settings(argv):
    signals.install()
    host.apply(FLAGS.host_allocator)
    host.split_cpu(FLAGS.cpu_devices)
    return main(argv)

  app.run(one_line_errors(with_host_settings, on_stop), flags_parser=parse_flags)
