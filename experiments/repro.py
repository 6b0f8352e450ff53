r"""Reproduce a study of the source material or the papers (bnjax.lab.repro; the results are in docs/results.md).

    python experiments/repro.py --study=seed000                  # the CPU budget
    python experiments/repro.py --study=seed003 --budget=full    # the source's budget (GPU/TPU)
    python experiments/repro.py --study=renorm --set=epochs=10 --set=seeds=[0,1,2]
    python experiments/repro.py --study=all

Outputs in <out>/<study>/: results.json (numbers, settings, hardware, wall
time), table.md and PNG plots. Re-running reuses the runs already finished.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bnjax import repro  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('study', None, 'One of: ' + '; '.join(f'{k}: {s.description}' for k, s in repro.STUDIES.items())
                    + '; or all.')
flags.DEFINE_enum('budget', 'cpu', repro.BUDGETS, "cpu: a budget a 2-core machine runs in minutes; full: the "
                  "source's or paper's budget.")
flags.DEFINE_multi_string('set', [], 'A study setting NAME=VALUE (VALUE in JSON), e.g. --set=epochs=5 '
                          '--set=seeds=[0,1]; repeatable.')
flags.DEFINE_string('out', 'runs/repro', 'Output folder; each study writes <out>/<study>/.')
flags.DEFINE_string('data_dir', None, 'Folder with the real MNIST / CIFAR-10 files; unset: TFDS.')
flags.mark_flag_as_required('study')


def parse_settings(items: list[str]) -> dict:
  """`['epochs=5', 'seeds=[0,1]']` -> `{'epochs': 5, 'seeds': [0, 1]}` (values in JSON; bare words as strings)."""
  settings = {}
  for item in items:
    name, sep, text = item.partition('=')
    if not sep or not name:
      raise app.UsageError(f'--set={item!r}: expected NAME=VALUE.')
    try:
      settings[name] = json.loads(text)
    except json.JSONDecodeError:
      settings[name] = text
  return settings


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  names = list(repro.STUDIES) if FLAGS.study == 'all' else [FLAGS.study]
  overrides = parse_settings(FLAGS.set)
  if overrides and len(names) > 1:
    raise app.UsageError('--set applies to one study; name it with --study.')
  try:
    for name in names:
      repro.settings_for(name, FLAGS.budget, overrides)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  command = ' '.join(shlex.quote(a) for a in ['python', 'experiments/repro.py'] + sys.argv[1:])
  for name in names:
    results = repro.run_study(name, FLAGS.out, budget=FLAGS.budget, overrides=overrides, data_dir=FLAGS.data_dir,
                              command=command)
    print(results['table'])
  return 0


if __name__ == '__main__':
  app.run(main)
