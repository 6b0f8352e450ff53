r"""Run a named study (bnjax/lab/studies/: the source's comparisons, the sweeps, the reproductions of docs/results.md).

    python experiments/study.py --study=mnist_plain_vs_bn            # the main job
    python experiments/study.py --study=momentum --epochs=20         # a sweep, at a larger budget
    python experiments/study.py --study=repro_renorm --budget=full --seeds=0,1,2,3,4
    python experiments/study.py --study=repro_all                     # every reproduction
    python experiments/study.py --list                                # every study and its settings

A study's settings are flags: `--NAME=VALUE`, `--NAME=V1,V2` for lists (the
same syntax as the sweep's flags); a study of training options takes every
training option. Outputs in <out>/<study>/: results.json (numbers, settings,
hardware, wall time), table.md, PNG plots, and the runs (re-running reuses
finished runs and continues stopped ones; runs there with other settings are
refused: --overwrite trains the study afresh).
"""

from __future__ import annotations

import shlex
import sys

from absl import flags

from bnjax.lab import cli, entry, studies
from bnjax.lab.study import BUDGETS

FLAGS = flags.FLAGS
flags.DEFINE_string('study', None, f'The study (--list lists them); {studies.ALL_REPRODUCTIONS}: every reproduction.')
flags.DEFINE_enum('budget', 'cpu', BUDGETS, "cpu: a budget a 2-core machine runs in minutes; full: the source's or "
                  "paper's budget.")
flags.DEFINE_string('out', 'runs/studies', 'Output folder; each study writes <out>/<study>/.')
flags.DEFINE_bool('resume', False, "Continue the study's runs in <out>/<study>/ (without it, finished runs are "
                  'reused and stopped ones continued too; --resume only insists that they are there).')
flags.DEFINE_bool('overwrite', False, "Delete <out>/<study>/ first: every run of the study trains again (e.g. after "
                  'changing a setting of a study whose runs are there).')
flags.DEFINE_bool('list', False, 'List the studies and their settings, and exit.')
flags.DEFINE_bool('verbose', False, 'Show the traceback of an error (users get one line without it).')
for _name in studies.setting_names():
  flags.DEFINE_string(_name, None, f'Comma-separated values of the study setting {_name} (or of that training '
                      'option, in a study of training options).')


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments {argv[1:]}: every setting is a --flag (see --list).')
  if FLAGS.list:
    print(entry.describe_studies())
    return 0
  if FLAGS.study is None:
    raise ValueError('--study is required: name one (--list lists them).')
  overrides = {name: FLAGS[name].value for name in studies.setting_names()
               if FLAGS[name].present and name != 'data_dir'}  # --data_dir: where the data is, for every study
  command = ' '.join(shlex.quote(a) for a in ['python', 'experiments/study.py'] + sys.argv[1:])
  return entry.run_studies(FLAGS.study, FLAGS.out, budget=FLAGS.budget, overrides=overrides,
                           data_dir=FLAGS.data_dir, command=command, resume=FLAGS.resume, overwrite=FLAGS.overwrite)


if __name__ == '__main__':
  cli.run(main)
