"""docs/results.md section 2: the source's CIFAR-10 CNN with BN, its validation accuracy per epoch beside the
source's log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from bnjax.lab import config as config_lib
from bnjax.lab.config import TrainConfig
from bnjax.lab.report import markdown_table
from bnjax.lab.study import Study
from bnjax.lab.study_common import CIFAR

# The source's validation accuracy by epoch (its log), and its Keras code's on this data, here.
SOURCE_LOG = {1: 0.5887, 2: 0.6417, 3: 0.6533, 4: 0.6819, 8: 0.6963, 30: 0.6756}
SOURCE_KERAS_HERE = {1: 0.5819}


def run(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  from bnjax.lab import experiment, plots

  config = config_lib.validate(TrainConfig(**{**CIFAR, 'epochs': settings['epochs'], 'seed': settings['seed'],
                                              'data_dir': data_dir, 'workdir': str(out / 'run')}))
  summary = experiment.run(config, resume='auto', progress=False, log=log, folder_flag=None)
  history = [json.loads(line) for line in (out / 'run' / 'metrics.jsonl').read_text().splitlines()][: config.epochs]
  ours = {m['epoch']: m['val_accuracy'] for m in history}
  epochs = sorted(set(SOURCE_LOG) | {1, 2, 3, 4, 8} | {max(ours)})
  rows = [[e, f'{ours[e]:.4f}' if e in ours else '(not run)', f'{SOURCE_LOG[e]:.4f}' if e in SOURCE_LOG else '-',
           f'{SOURCE_KERAS_HERE[e]:.4f}' if e in SOURCE_KERAS_HERE else '-'] for e in epochs]
  best = max(history, key=lambda m: m['val_accuracy'])
  rows.append(['best', f'{best["val_accuracy"]:.4f} (epoch {best["epoch"]})', '0.6963 (epoch 8)', '-'])
  table = markdown_table(['epoch', 'bnjax val accuracy', 'source log', 'source Keras code, here'], rows)
  plots.plot_against_source_log(history, SOURCE_LOG, out / 'seed003_curves.png',
                                f'CIFAR-10 CNN with BN (Adam 1e-4, batch 32): {len(history)} of 30 epochs')
  return {'table': table, 'results': {'history': history, 'summary': summary}}


STUDY = Study('repro_seed003', 'CIFAR-10 CNN with BN (Adam 1e-4, batch 32, 30% held out): validation accuracy per '
              'epoch.', run, {'cpu': dict(epochs=10, seed=0), 'full': dict(epochs=30, seed=0)})
