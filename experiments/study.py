r"""Run a named study: the source's comparisons, the sweeps and the reproductions of docs/results.md.

    python experiments/study.py --study=mnist_plain_vs_bn            # the main job (old name: seed000)
    python experiments/study.py --study=momentum --epochs=20         # a sweep, at a larger budget
    python experiments/study.py --study=repro_renorm --budget=full --seeds=0,1,2,3,4
    python experiments/study.py --list                                # every study and its settings

A study's settings are flags: `--NAME=VALUE`, `--NAME=V1,V2` for lists (the
same syntax as the sweep's flags); a grid study takes every training option.
Outputs in <out>/<study>/: results.json (numbers, settings, hardware, wall
time), table.md, PNG plots, and the runs (re-running reuses finished runs and continues stopped
ones; runs there with other settings are refused: --overwrite trains the study afresh).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from absl import flags

from bnjax.lab import cli, studies

FLAGS = flags.FLAGS
flags.DEFINE_string('study', None, 'The study (--list lists them); "all": every reproduction.')
flags.DEFINE_enum('budget', 'cpu', studies.BUDGETS, "cpu: a budget a 2-core machine runs in minutes; full: the "
                  "source's or paper's budget.")
flags.DEFINE_string('out', 'runs/studies', 'Output folder; each study writes <out>/<study>/.')
flags.DEFINE_bool('resume', False, "Continue the study's runs in <out>/<study>/ (without it, finished runs are "
                  'reused and stopped ones continued too; --resume only insists that they are there).')
flags.DEFINE_bool('overwrite', False, "Delete <out>/<study>/ first: every run of the study trains again (e.g. after "
                  'changing a setting of a study whose runs are there).')
flags.DEFINE_bool('list', False, 'List the studies, their old names and settings, and exit.')
flags.DEFINE_multi_string('set', [], 'Deprecated (use --NAME=VALUE): a setting NAME=VALUE.')
flags.DEFINE_bool('verbose', False, 'Show the traceback of an error (users get one line without it).')
for _name in studies.setting_names():
  flags.DEFINE_string(_name, None, f'Comma-separated values of the study setting {_name} (or of that training '
                      'option, in a grid study).')


def given_settings() -> dict[str, str]:
  settings = {name: FLAGS[name].value for name in studies.setting_names()
              if FLAGS[name].present and name != 'data_dir'}  # --data_dir: where the data is, for every study
  for item in FLAGS.set:
    name, sep, text = item.partition('=')
    if not sep or not name:
      raise ValueError(f'--set={item!r} is invalid: expected NAME=VALUE (or use --NAME=VALUE).')
    settings[name] = text.strip('[]')
  return settings


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments {argv[1:]}: every setting is a --flag (see --list).')
  if FLAGS.list:
    for study in studies.STUDIES.values():
      aliases = f' (old name: {", ".join(study.aliases)})' if study.aliases else ''
      settings = 'every training option' if study.grid else ', '.join(study.budgets['cpu'])
      print(f'{study.name}{aliases}: {study.description}\n    settings: {settings}')
    return 0
  if FLAGS.study is None:
    raise ValueError('--study is required: name one (--list lists them).')
  names = [n for n in studies.STUDIES if n.startswith('repro_')] if FLAGS.study == 'all' else [FLAGS.study]
  overrides = given_settings()
  if overrides and len(names) > 1:
    raise ValueError('settings apply to one study; name it with --study.')
  for name in names:
    studies.settings_for(name, FLAGS.budget, overrides)  # every setting checked before any work
  command = ' '.join(shlex.quote(a) for a in ['python', f'experiments/{Path(sys.argv[0]).name}'] + sys.argv[1:])
  for name in names:
    results = studies.run_study(name, FLAGS.out, budget=FLAGS.budget, overrides=overrides,
                                data_dir=FLAGS.data_dir, command=command, resume=FLAGS.resume,
                                overwrite=FLAGS.overwrite)
    print(results['table'])
  return 0


if __name__ == '__main__':
  cli.run(main)
