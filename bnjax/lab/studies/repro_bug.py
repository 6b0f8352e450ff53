"""docs/results.md section 7: the moving-statistics bug (updates never applied), and center/scale off after the
nonlinearity, on the MNIST MLP."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

from bnjax.lab import config as config_lib
from bnjax.lab.config import TrainConfig
from bnjax.lab.report import markdown_table
from bnjax.lab.study import Study
from bnjax.lab.study_common import MNIST, cell, matching, sweep_records

# The models compared: name -> the fields that differ from BN before the ReLU.
MODELS = {
    'BN before ReLU (the usual order)': dict(norm='bn'),
    'BN, moving statistics never updated (--update_stats=false)': dict(norm='bn', update_stats=False),
    'BN after ReLU, center/scale on': dict(norm='bn', norm_position='after_activation'),
    'BN after ReLU, center/scale off': dict(norm='bn', norm_position='after_activation', center=False, scale=False),
    'BN before ReLU, center/scale off': dict(norm='bn', center=False, scale=False),
}
_USUAL = dict(norm_position='before_activation', center=True, scale=True, update_stats=True)


def run(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  base = TrainConfig(**MNIST, scaling='unit', batch_size=500, epochs=settings['epochs'], data_dir=data_dir)
  configs = [config_lib.validate(dataclasses.replace(base, seed=seed, **fields))
             for fields in MODELS.values() for seed in settings['seeds']]
  records = sweep_records(configs, out / 'sweep', log)
  rows, results = [], {}
  for name, fields in MODELS.items():
    runs = matching(records, **{**_USUAL, **fields})
    moving = [r.get('test_accuracy_moving_stats') for r in runs]
    batch = [r.get('test_accuracy_batch_stats') for r in runs]
    rows.append([name, cell(moving), cell(batch)])
    results[name] = {'test_accuracy_moving_stats': moving, 'test_accuracy_batch_stats': batch}
  table = markdown_table(['model (MNIST MLP, batch 500)', 'test acc, moving statistics (inference)',
                          'test acc, batch statistics'], rows)
  return {'table': table, 'results': results}


STUDY = Study('repro_bug', 'The moving-statistics bug and center/scale off after the nonlinearity (MNIST MLP).', run,
              {'cpu': dict(epochs=20, seeds=[0, 1, 2]), 'full': dict(epochs=20, seeds=[0, 1, 2])})
