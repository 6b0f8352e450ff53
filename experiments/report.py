r"""Rebuild a sweep's report.md and plots from its results.csv.

    python experiments/report.py runs/sweeps/momentum/results.csv [--out_dir=DIR]
"""

from __future__ import annotations

from absl import app, flags


from bnjax.lab import report

FLAGS = flags.FLAGS
flags.DEFINE_string('out_dir', None, 'Where report.md and the PNGs go (default: beside results.csv).')
flags.DEFINE_string('command', '', 'The command that produced the sweep (default: from sweep.json beside it).')


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: experiments/report.py PATH/results.csv')
  report.write_report(argv[1], command=FLAGS.command, out_dir=FLAGS.out_dir)
  return 0


if __name__ == '__main__':
  app.run(main)
