"""docs/results.md section 6: batch renorm vs BN vs no norm with statistics over ghost batches of 2..32
examples (the MNIST MLP), renorm with the paper's clipping warm-up scaled to the run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

from bnjax.lab import config as config_lib
from bnjax.lab import report as report_lib
from bnjax.lab.config import TrainConfig
from bnjax.lab.report import markdown_table
from bnjax.lab.study import Study
from bnjax.lab.study_common import (MNIST, cell, check_ghost_sizes, ghost_bn, ghost_renorm, in_steps,
                                    sweep_records)

RECORD_KEYS = ('config', 'test_accuracy_moving_stats', 'test_accuracy_batch_stats', 'best_val_accuracy')


def run(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  from bnjax.lab import plots

  batch = settings['batch_size']
  check_ghost_sizes(settings['ghost_sizes'], batch)
  base = in_steps(TrainConfig(**MNIST, scaling='unit', batch_size=batch, data_dir=data_dir), settings['epochs'])
  configs = []
  for seed in settings['seeds']:
    configs.append(dataclasses.replace(base, norm='none', seed=seed))
    for ghost in settings['ghost_sizes']:
      configs += [ghost_bn(base, ghost, seed=seed), ghost_renorm(base, ghost, seed=seed)]
  configs = [config_lib.validate(c) for c in configs]
  records = sweep_records(configs, out / 'sweep', log)
  kinds = {'bn': lambda c: c['norm'] in ('bn', 'ghost'), 'renorm': lambda c: c['norm'] == 'renorm'}
  ghost_of = lambda c: c['virtual_batch_size'] or c['batch_size']
  none_runs = [r for r in records if r['config']['norm'] == 'none']
  rows = []
  series: dict[str, list] = {'BN': [], 'renorm': []}
  for ghost in settings['ghost_sizes']:
    row = [ghost]
    for label, kind in (('BN', 'bn'), ('renorm', 'renorm')):
      runs = [r for r in records if kinds[kind](r['config']) and ghost_of(r['config']) == ghost]
      moving = [r.get('test_accuracy_moving_stats') for r in runs]
      row += [cell(moving), cell([r.get('test_accuracy_batch_stats') for r in runs])]
      series[label].append(report_lib.mean_std(moving))
    row.append(cell([r.get('test_accuracy_moving_stats') for r in none_runs]))
    rows.append(row)
  table = markdown_table(['BN batch (ghost) size', 'BN: moving stats', 'BN: batch stats', 'renorm: moving stats',
                          'renorm: batch stats', 'no norm'], rows)
  none_mean = report_lib.mean_std([r.get('test_accuracy_moving_stats') for r in none_runs])[0]
  panel = {'series': series, 'lines': {'no norm': (none_mean, 'k')},
           'xlabel': f'examples per BN batch (ghost batches of a batch of {batch})'}
  plots.plot_accuracy_by_ghost_size({f'MNIST MLP, {base.steps} steps': panel}, settings['ghost_sizes'],
                                    out / 'renorm.png', ylabel='test accuracy (moving statistics)')
  return {'table': table, 'results': [{k: r.get(k) for k in RECORD_KEYS} for r in records]}


STUDY = Study('repro_renorm', 'Batch renorm vs BN vs no norm with BN over ghost batches of 2, 4, 8, 32 (MNIST MLP).',
              run, {'cpu': dict(batch_size=128, ghost_sizes=[2, 4, 8, 32], epochs=5, seeds=[0, 1, 2]),
                    'full': dict(batch_size=128, ghost_sizes=[2, 4, 8, 32], epochs=20, seeds=[0, 1, 2])})
