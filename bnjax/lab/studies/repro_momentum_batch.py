"""docs/results.md section 4: BN momentum (0.6..0.99, inverse decay) x batch size (32..5000) on the MNIST MLP,
as heatmaps and a table of the best momentum per batch size."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from bnjax.lab import report as report_lib
from bnjax.lab.config import TrainConfig
from bnjax.lab.report import markdown_table
from bnjax.lab.study import Study
from bnjax.lab.study_common import MNIST, MOMENTA, sweep_records


def run(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  from bnjax.lab import sweep

  base = TrainConfig(**MNIST, scaling='unit', norm='bn', epochs=settings['epochs'], data_dir=data_dir)
  grid = dict(momentum=list(settings['momenta']), momentum_schedule=['constant', 'inverse_decay'],
              batch_size=list(settings['batch_sizes']), seed=list(settings['seeds']))
  configs, _ = sweep.expand_grid(base, grid)
  records = sweep_records(configs, out / 'sweep', log)
  rows = [dict(sweep.result_row(r)) for r in records]
  report_lib.plot_heatmap(rows, out / 'momentum_batch_accuracy.png',
                          title=f'test accuracy, moving statistics ({settings["epochs"]} epochs)')
  report_lib.plot_heatmap(rows, out / 'momentum_batch_stats_gap.png', 'stats_gap',
                          'test accuracy: batch statistics - moving statistics')
  momenta = report_lib.sorted_labels({report_lib.momentum_label(r) for r in rows})
  accuracy = report_lib.aggregate(rows, ['batch_size', 'momentum'])
  gap = report_lib.aggregate(rows, ['batch_size', 'momentum'], 'stats_gap')
  table_rows = []
  for batch in sorted({r['batch_size'] for r in rows}):
    best = max(momenta, key=lambda m: accuracy[(batch, m)][0])
    table_rows.append([batch] + [('**' if m == best else '') + f'{accuracy[(batch, m)][0]:.4f}' +
                                 ('**' if m == best else '') + f' ({gap[(batch, m)][0]:+.4f})' for m in momenta])
  table = markdown_table(['batch size'] + [f'momentum {m}' for m in momenta], table_rows)
  keys = ('batch_size', 'momentum', 'momentum_schedule', 'seed', 'test_accuracy_moving_stats',
          'test_accuracy_batch_stats', 'stats_gap')
  return {'table': table, 'results': {'rows': [{k: r[k] for k in keys} for r in rows]}}


STUDY = Study('repro_momentum_batch', 'BN momentum (0.6..0.99, inverse decay) x batch size (32..5000), MNIST MLP.',
              run, {'cpu': dict(epochs=3, seeds=[0, 1], momenta=MOMENTA, batch_sizes=[32, 128, 500, 5000]),
                    'full': dict(epochs=20, seeds=[0, 1, 2], momenta=MOMENTA, batch_sizes=[32, 128, 500, 5000])})
