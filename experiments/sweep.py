r"""Sweep BN hyperparameters: a grid of runs, trained K at a time as one vmapped program.

    python experiments/sweep.py --momentum=0.6,0.9,0.99 --batch_size=32,128,500 \
        --dropout_placement=none,before_norm,end --dropout_rate=0.5 --norm=bn,renorm --seed=0,1,2
    python experiments/sweep.py --momentum=0.6,0.9,0.99 --seed=0,1 --dry_run   # list runs and groups, no training

Every option of the table (`bnjax.lab.options`) is a flag taking
comma-separated values; one value sets it for every run, several make an axis
of the grid. Each run's `--model` (a registered name or the import path of
your own builder) gives its own training settings as the defaults of the flags
not given (`--model=resnet20`: He et al.'s recipe). Re-running the same command
in the same --sweep_dir skips finished runs. Outputs: <sweep_dir>/runs/<run_id>.json
and runs/<run_id>/ (metrics.jsonl, TensorBoard), results.csv, report.md and PNGs.
The named grids (momentum, batch_size, ...) are studies: `./launch.sh list`.
"""

from __future__ import annotations

import shlex
import sys

from absl import flags

from bnjax.lab import cli, entry, sweep
from bnjax.lab import config as config_lib

FLAGS = flags.FLAGS
flags.DEFINE_string('sweep_dir', None, 'Output folder (default: runs/sweeps/grid). Re-use it to resume.')
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


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments {argv[1:]}: every setting is a --flag (see --helpfull).')
  grid = cli.given_options(lists=True)
  if FLAGS.seeds is not None:
    grid['seed'] = config_lib.parse_values('seed', FLAGS.seeds)
  return entry.sweep(grid, sweep_dir=FLAGS.sweep_dir, dry_run=FLAGS.dry_run, max_group_size=FLAGS.max_group_size,
                     interrupt_after_groups=FLAGS.interrupt_after_groups,
                     interrupt_after_epoch=FLAGS.interrupt_after_epoch, report=FLAGS.report,
                     num_workers=FLAGS.num_workers, worker_index=FLAGS.worker_index,
                     claim_timeout=FLAGS.claim_timeout, coordinator_timeout=FLAGS.coordinator_timeout,
                     command=' '.join(shlex.quote(a) for a in ['python', 'experiments/sweep.py'] + sys.argv[1:]))


if __name__ == '__main__':
  cli.run(main, on_stop='finished runs and the last checkpoint of the group in flight are '
          'kept: the same command continues the sweep.')
