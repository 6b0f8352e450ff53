r"""Sweep BN hyperparameters: a grid of runs, trained K at a time as one vmapped program.

    python experiments/sweep.py --preset=momentum                        # a grid study (bnjax.lab.studies)
    python experiments/sweep.py --preset=momentum --epochs=20 --dry_run  # list runs and groups, no training
    python experiments/sweep.py --momentum=0.6,0.9,0.99 --batch_size=32,128,500 \
        --dropout_placement=none,before_norm,end --dropout_rate=0.5 --norm=bn,renorm --seed=0,1,2

Every option of the table (`bnjax.lab.options`) is a flag taking
comma-separated values; one value sets it for every run, several make an axis
of the grid. Without a preset, each run's `--model` (a registered name or the
import path of your own builder) gives its own training settings as the
defaults of the flags not given (`--model=resnet20`: He et al.'s recipe). Re-running the same command in the same --sweep_dir skips
finished runs. Outputs: <sweep_dir>/runs/<run_id>.json and runs/<run_id>/
(metrics.jsonl, TensorBoard), results.csv, report.md and PNGs.
"""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path

from absl import flags

from bnjax.lab import cli, loop, parallel, storage, studies, sweep

FLAGS = flags.FLAGS
flags.DEFINE_string('preset', None, 'A grid study: ' + '; '.join(
    f'{s.name}: {s.description}' for s in studies.STUDIES.values() if s.sweep))
flags.DEFINE_string('sweep_dir', None, 'Output folder (default: runs/sweeps/<preset or grid>). Re-use it to resume.')
flags.DEFINE_string('seeds', None, 'Comma-separated seeds (same as --seed).')
flags.DEFINE_bool('dry_run', False, 'List the runs and their grouping, train nothing.')
flags.DEFINE_integer('max_group_size', None, 'At most this many runs per vmapped program (memory).')
flags.DEFINE_bool('report', True, 'Write report.md and its plots at the end.')
flags.DEFINE_integer('interrupt_after_groups', None, 'Fault injection: exit with status 3 after this many groups.')
flags.DEFINE_integer('interrupt_after_epoch', None, "Fault injection: exit with status 3 after this epoch's checkpoint "
                     'of the first group.')
flags.DEFINE_integer('num_workers', None, 'Independent workers sharing --sweep_dir (default: $SLURM_ARRAY_TASK_COUNT, '
                     'else 1): each claims a group before training it, so no group trains twice.')
flags.DEFINE_integer('worker_index', None, "This worker's index in [0, --num_workers) (default: from "
                     '$SLURM_ARRAY_TASK_ID, else 0).')
flags.DEFINE_float('claim_timeout', sweep.CLAIM_TIMEOUT, 'Seconds without a heartbeat after which a group claimed by '
                   'a worker is taken over (the worker died); it resumes from its checkpoint.')
cli.define_option_flags(lists=True)


def grid_flags() -> dict[str, list]:
  """`{field: [values]}` of the option flags given."""
  values = cli.given_options(lists=True)
  if FLAGS.seeds is not None:
    values['seed'] = studies.config_lib.parse_values('seed', FLAGS.seeds)
  return values


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments {argv[1:]}: every setting is a --flag (see --helpfull).')
  if FLAGS.max_group_size is not None and FLAGS.max_group_size < 1:
    raise ValueError(f'--max_group_size={FLAGS.max_group_size} is invalid: expected a positive integer (or unset '
                     'for no cap).')
  num_workers, worker_index = storage.resolve_workers(FLAGS.num_workers, FLAGS.worker_index)
  if not (math.isfinite(FLAGS.claim_timeout) and FLAGS.claim_timeout > 0):
    raise ValueError(f'--claim_timeout={FLAGS.claim_timeout} is invalid: expected a finite number of seconds > 0 '
                     f'(default {sweep.CLAIM_TIMEOUT:g}).')
  given = grid_flags()
  finalize = None
  if FLAGS.preset:
    study = studies.get(FLAGS.preset)
    if not study.sweep:
      raise ValueError(f'--preset={FLAGS.preset!r} is invalid: expected one of {", ".join(studies.GRID_STUDIES)}.')
    settings = studies.settings_for(FLAGS.preset, 'cpu', {k: v if len(v) > 1 else v[0] for k, v in given.items()})
    finalize = study.finalize
    given = {k: v if isinstance(v, list) else [v] for k, v in settings.items()}
  base = studies.config_lib.unchecked({k: v[0] for k, v in given.items() if len(v) == 1})
  grid = {k: v for k, v in given.items() if len(v) > 1}
  # Without a preset, each run's model gives the defaults of the options not given (its own training settings).
  configs, notes = sweep.expand_grid(base, grid, finalize, given=None if FLAGS.preset else set(given))
  if not configs:
    raise ValueError('no valid run in the grid: ' + ' | '.join(notes))
  groups = sweep.group_runs(configs, FLAGS.max_group_size)
  from bnjax.lab import build

  for group in groups:  # each group's model is built once now: a user's builder that raises fails before any work
    build.model(group[0])
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
  parallel.initialize(base.coordinator_address, base.num_processes, base.process_id, FLAGS.coordinator_timeout)  # when asked (multi-host)
  try:
    records = sweep.run_sweep(configs, sweep_dir, command=command, max_group_size=FLAGS.max_group_size,
                              interrupt_after_groups=FLAGS.interrupt_after_groups,
                              interrupt_after_epoch=FLAGS.interrupt_after_epoch, report=FLAGS.report,
                              num_workers=num_workers, worker_index=worker_index, claim_timeout=FLAGS.claim_timeout)
  except (sweep.Interrupted, loop.Interrupted) as error:
    print(error)
    return 3
  if len(records) < len(configs):
    print(f'{len(configs) - len(records)} run(s) still training in other workers; the last worker to finish writes '
          'the complete results.csv')
    return 0
  statuses = [r['status'] for r in records]
  print(f'{sweep_dir / "results.csv"}: ' + ', '.join(f'{statuses.count(s)} {s}' for s in sorted(set(statuses))))
  return 0 if all(s == sweep.STATUS_COMPLETED for s in statuses) else 1


if __name__ == '__main__':
  cli.run(main, on_stop='finished runs and the last checkpoint of the group in flight are '
          'kept: the same command continues the sweep.')
