r"""Sweep BN hyperparameters: a grid of runs, trained K at a time as one vmapped program.

    python experiments/sweep.py --preset=momentum                        # a study (bnjax.lab.sweep.PRESETS)
    python experiments/sweep.py --preset=momentum --epochs=20 --dry_run  # list runs and groups, no training
    python experiments/sweep.py --momentum=0.6,0.9,0.99 --batch_size=32,128,500 \
        --dropout_placement=none,before_norm,end --dropout_rate=0.5 --norm=bn,renorm --seeds=0,1,2

Every field of `bnjax.lab.config.TrainConfig` is a flag taking comma-separated
values; one value sets it for every run, several make an axis of the grid.
Re-running the same command in the same --sweep_dir skips finished runs.
Outputs: <sweep_dir>/runs/<run_id>.json, results.csv, report.md and PNGs.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bnjax import config as config_lib  # noqa: E402
from bnjax import sweep  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('preset', None, 'A study: ' + '; '.join(f'{k}: {v["description"]}' for k, v in sweep.PRESETS.items()))
flags.DEFINE_string('sweep_dir', None, 'Output folder (default: runs/sweeps/<preset or grid>). Re-use it to resume.')
flags.DEFINE_string('seeds', None, 'Comma-separated seeds (same as --seed).')
flags.DEFINE_bool('dry_run', False, 'List the runs and their grouping, train nothing.')
flags.DEFINE_integer('max_group_size', None, 'At most this many runs per vmapped program (memory).')
flags.DEFINE_bool('report', True, 'Write report.md and its plots at the end.')
flags.DEFINE_integer('interrupt_after_groups', None, 'Fault injection: exit with status 3 after this many groups.')
for _name in config_lib.FIELDS:
  flags.DEFINE_string(_name, None, f'Comma-separated values of TrainConfig.{_name}.')


def grid_flags() -> dict[str, list]:
  """`{field: [values]}` of the TrainConfig flags given."""
  values = {name: sweep.parse_values(name, FLAGS[name].value) for name in config_lib.FIELDS if FLAGS[name].present}
  if FLAGS.seeds is not None:
    values['seed'] = sweep.parse_values('seed', FLAGS.seeds)
  return values


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    given = grid_flags()
    if FLAGS.preset:
      base, grid, finalize = sweep.preset_grid(FLAGS.preset, given)
    else:
      base = config_lib.TrainConfig(**{k: v[0] for k, v in given.items() if len(v) == 1})
      grid, finalize = {k: v for k, v in given.items() if len(v) > 1}, None
    configs, notes = sweep.expand_grid(base, grid, finalize)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  if not configs:
    raise app.UsageError('no valid run in the grid:\n' + '\n'.join(notes))
  groups = sweep.group_runs(configs, FLAGS.max_group_size)
  sweep_dir = Path(FLAGS.sweep_dir or Path('runs') / 'sweeps' / (FLAGS.preset or 'grid'))
  command = ' '.join(shlex.quote(a) for a in ['python', 'experiments/sweep.py'] + sys.argv[1:])
  print(f'{len(configs)} runs in {len(groups)} group(s) (one compiled program each) -> {sweep_dir}')
  for note in notes:
    print(f'  note: {note}')
  if FLAGS.dry_run:
    done = sweep.finished_runs(sweep_dir)
    print(sweep.describe_groups(groups))
    print(f'{sum(sweep.run_id(c) in done for c in configs)} of them already finished in {sweep_dir}')
    return 0
  try:
    records = sweep.run_sweep(configs, sweep_dir, command=command, max_group_size=FLAGS.max_group_size,
                              interrupt_after_groups=FLAGS.interrupt_after_groups, report=FLAGS.report)
  except sweep.Interrupted as error:
    print(error)
    return 3
  statuses = [r['status'] for r in records]
  print(f'{sweep_dir / "results.csv"}: ' + ', '.join(f'{statuses.count(s)} {s}' for s in sorted(set(statuses))))
  return 0 if all(s == sweep.STATUS_COMPLETED for s in statuses) else 1


if __name__ == '__main__':
  app.run(main)
