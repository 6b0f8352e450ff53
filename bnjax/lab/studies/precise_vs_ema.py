"""EMA vs precise BN statistics (Wu & Johnson 2021) over BN momentum x batch size on the MNIST MLP, and the
moving-statistics bug (`--update_stats=false`) repaired after the fact by precise statistics."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

from bnjax.lab import config as config_lib
from bnjax.lab import report as report_lib
from bnjax.lab.report import markdown_table
from bnjax.lab.study import Study
from bnjax.lab.study_common import MNIST, MOMENTA, cell, matching, sweep_records

RECORD_KEYS = ('config', 'test_accuracy_moving_stats', 'test_accuracy_batch_stats', 'test_accuracy_precise_stats')


def run(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  from bnjax.lab import sweep

  base = config_lib.unchecked(dict(MNIST, scaling='unit', norm='bn', epochs=settings['epochs'], data_dir=data_dir,
                                   precise_bn=settings['precise_examples']))
  grid = dict(momentum=list(settings['momenta']), momentum_schedule=['constant', 'inverse_decay'],
              batch_size=list(settings['batch_sizes']), seed=list(settings['seeds']))
  configs, _ = sweep.expand_grid(base, grid)
  bug, _ = sweep.expand_grid(dataclasses.replace(base, batch_size=500),
                             dict(update_stats=[True, False], seed=list(settings['seeds'])))
  records = sweep_records(configs + [c for c in bug if c not in configs], out / 'sweep', log)
  grid_ids = {config_lib.run_id(c) for c in configs}
  rows = [sweep.result_row(r) for r in records if r['run_id'] in grid_ids]
  for metric, name, title in (('test_accuracy_moving_stats', 'ema', 'moving averages (EMA)'),
                              ('test_accuracy_precise_stats', 'precise', 'precise statistics')):
    report_lib.plot_heatmap(rows, out / f'precise_vs_ema_{name}.png', metric,
                            f'test accuracy, {title} ({settings["epochs"]} epochs)')
  momenta = report_lib.sorted_labels({report_lib.momentum_label(r) for r in rows})
  moving = report_lib.aggregate(rows, ['batch_size', 'momentum'], 'test_accuracy_moving_stats')
  precise = report_lib.aggregate(rows, ['batch_size', 'momentum'], 'test_accuracy_precise_stats')
  table_rows = [[batch] + [f'{moving[(batch, m)][0]:.4f} / {precise[(batch, m)][0]:.4f}' for m in momenta]
                for batch in sorted({r['batch_size'] for r in rows})]
  bug_rows = []
  for update in (True, False):
    runs = matching(records, batch_size=500, update_stats=update, momentum=0.99, momentum_schedule='constant')
    bug_rows.append([f'--update_stats={str(update).lower()}'] +
                    [cell([r.get(k) for r in runs]) for k in ('test_accuracy_moving_stats', 'test_accuracy_batch_stats',
                                                              'test_accuracy_precise_stats')])
  table = (markdown_table(['batch size'] + [f'momentum {m}: EMA / precise' for m in momenta], table_rows) + '\n\n' +
           markdown_table(['MLP, batch 500, momentum 0.99', 'moving statistics', 'batch statistics',
                           'precise statistics'], bug_rows))
  return {'table': table, 'results': [{k: r.get(k) for k in RECORD_KEYS} for r in records]}


STUDY = Study('precise_vs_ema', 'EMA vs precise BN statistics (Wu & Johnson 2021) over BN momentum x batch size, '
              'MNIST MLP; the moving-statistics bug repaired after the fact by precise statistics.', run,
              {'cpu': dict(epochs=3, seeds=[0, 1], momenta=MOMENTA, batch_sizes=[32, 128, 500, 5000],
                           precise_examples=10_000),
               'full': dict(epochs=20, seeds=[0, 1, 2], momenta=MOMENTA, batch_sizes=[32, 128, 500, 5000],
                            precise_examples=10_000)})
