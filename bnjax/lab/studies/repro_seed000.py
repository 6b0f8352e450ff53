"""docs/results.md section 1: the MNIST MLP plain vs BN over seeds, beside the source's numbers, and BN momentum
0.9 / 0.6 (the same runs as one sweep)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from bnjax.lab import config as config_lib
from bnjax.lab.config import TrainConfig
from bnjax.lab.report import markdown_table
from bnjax.lab.study import Study
from bnjax.lab.study_common import MNIST, cell, matching, sweep_records

# The source's test accuracy (mean, std of 3 runs) of its Keras code on this data.
SOURCE_KERAS = {'plain': (0.9793, 0.0007), 'bn': (0.9782, 0.0018)}


def mean_history(records: Sequence[dict]) -> list[dict]:
  """Per epoch, the mean over runs (seeds) of each metric, over the epochs every run completed."""
  histories = [r['history'] for r in records if r.get('history')]
  length = min(len(h) for h in histories)
  keys = ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy')
  return [{'epoch': e + 1, **{k: float(np.mean([h[e][k] for h in histories])) for k in keys}} for e in range(length)]


def run(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  from bnjax.lab import plots

  base = TrainConfig(**MNIST, scaling='unit', batch_size=500, epochs=settings['epochs'], data_dir=data_dir)
  kinds = {'plain': dict(norm='none')}
  kinds.update({f'bn (momentum {m:g})': dict(norm='bn', momentum=m) for m in settings['momenta']})
  configs = [config_lib.validate(dataclasses.replace(base, seed=seed, **fields))
             for fields in kinds.values() for seed in settings['seeds']]
  records = sweep_records(configs, out / 'sweep', log)
  by_kind = {name: matching(records, **fields) for name, fields in kinds.items()}
  rows, results = [], {}
  for name, runs in by_kind.items():
    test = [r.get('test_accuracy_moving_stats') for r in runs]
    batch = [r.get('test_accuracy_batch_stats') for r in runs]
    best = [r.get('best_val_accuracy') for r in runs]
    reference = {'plain': SOURCE_KERAS['plain'], 'bn (momentum 0.99)': SOURCE_KERAS['bn']}.get(name)
    rows.append([name, cell(test), cell(batch) if runs[0]['config']['norm'] != 'none' else '-', cell(best),
                 f'{reference[0]:.4f} ± {reference[1]:.4f}' if reference else '-'])
    results[name] = {'test_accuracy': test, 'test_accuracy_batch_stats': batch, 'best_val_accuracy': best,
                     'mean_history': mean_history(runs)}
  table = markdown_table(['model', 'test accuracy (moving stats)', 'test accuracy (batch stats)',
                          'best epoch test accuracy', 'source (Keras, this data)'], rows)
  first_bn = next(name for name in by_kind if name != 'plain')
  plots.plot_curves({'plain': results['plain']['mean_history'], 'BN': results[first_bn]['mean_history']},
                    out / 'seed000_curves.png',
                    title=f'MNIST MLP, plain vs BN (mean of {len(settings["seeds"])} seeds)')
  plots.plot_accuracy_per_epoch({name: result['mean_history'] for name, result in results.items()},
                                out / 'seed000_momentum.png', 'MNIST MLP at batch 500: BN momentum', ylim=(0.95, 0.99))
  return {'table': table, 'results': results}


STUDY = Study('repro_seed000', 'MNIST MLP, plain vs BN (20 epochs, batch 500, Adam, 3 seeds), and BN momentum '
              '0.9 / 0.6.', run,
              {'cpu': dict(epochs=20, seeds=[0, 1, 2], momenta=[0.99, 0.9, 0.6]),
               'full': dict(epochs=20, seeds=[0, 1, 2], momenta=[0.99, 0.9, 0.6])})
