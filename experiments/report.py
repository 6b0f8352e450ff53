r"""Rebuild a sweep's report.md and plots from its results.csv.

    python experiments/report.py runs/sweeps/momentum/results.csv [--out_dir=DIR]
"""

from __future__ import annotations

from absl import app, flags

from bnjax.lab import cli, report

FLAGS = flags.FLAGS
flags.DEFINE_string('out_dir', None, 'Where report.md and the PNGs go (default: beside results.csv).')
flags.DEFINE_string('command', '', 'The command that produced the sweep (default: from sweep.json beside it).')


def main(argv):
  if len(argv) != 2:
    raise ValueError('give one results.csv: ./launch.sh report PATH/results.csv [--out_dir=DIR]')
  report.write_report(argv[1], command=FLAGS.command, out_dir=FLAGS.out_dir)
  return 0


if __name__ == '__main__':
  flags.DEFINE_bool('verbose', False, 'Show the traceback of an error (users get one line without it).')
  app.run(cli.one_line_errors(main), flags_parser=cli.parse_flags)
