"""docs/results.md section 5: dropout placement (none, before_norm, after_norm, end) x rate, with and without BN:
test accuracy and the variance shift (at initialization and trained), on the MNIST MLP and the CIFAR-10 CNN."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

from bnjax.lab import report as report_lib
from bnjax.lab.config import TrainConfig
from bnjax.lab.report import markdown_table
from bnjax.lab.study import Study
from bnjax.lab.study_common import CIFAR, MNIST, cell, matching, sweep_records

PLACEMENTS = ('none', 'before_norm', 'after_norm', 'end')
RECORD_KEYS = ('config', 'test_accuracy_moving_stats', 'test_accuracy_batch_stats', 'variance_shift',
               'variance_shift_blocks', 'moving_variance_ratio', 'moving_variance_ratio_blocks',
               'variance_shift_at_init', 'variance_shift_at_init_blocks')


def dropout_configs(base: TrainConfig, placements: Sequence[str], rates: Sequence[float], norms: Sequence[str],
                    seeds: Sequence[int]) -> list[TrainConfig]:
  """The grid placement x rate (and 0) x norm x seed over `base` (a placement 'none' once, its rate unused)."""
  from bnjax.lab import sweep

  configs, _ = sweep.expand_grid(base, dict(dropout_placement=list(placements), dropout_rate=[0.0] + list(rates),
                                            norm=list(norms), seed=list(seeds)))
  return configs


def shift_at_init(config: TrainConfig, images) -> dict:
  """`diagnostics.shift_summary` of `config`'s model at initialization, its moving statistics set to
  one training-mode pass over `images` (as if training had just begun and momentum were 0)."""
  import jax

  from bnjax.lab import build, diagnostics

  model = build.model(dataclasses.replace(config, momentum=0.0))
  images = diagnostics.probe_examples(images, config.virtual_batch_size)

  @jax.jit  # one program (op by op, a CNN's passes took seconds each)
  def shift(images, key):
    variables = model.init(key, images[: config.virtual_batch_size or 2], train=False)
    variables = diagnostics.with_batch_statistics(model, variables, images, jax.random.fold_in(key, 1))
    return diagnostics.variance_shift(model, variables, images, jax.random.fold_in(key, 2))

  return diagnostics.shift_summary(shift(images, jax.random.PRNGKey(config.seed)))


def add_shift_at_init(records: Sequence[dict]) -> None:
  """Adds `variance_shift_at_init` (and its blocks) to each record: seed 0's model of its setting."""
  import jax

  from bnjax.lab import build
  from bnjax.lab.config import run_id

  cache: dict[str, dict] = {}
  images = None
  for record in records:
    config = TrainConfig(**{**record['config'], 'seed': 0})
    key = run_id(config)
    if key not in cache:
      images = images if images is not None else build.dataset(config).test_images
      cache[key] = shift_at_init(config, jax.numpy.asarray(images))
    record['variance_shift_at_init'] = cache[key]['variance_shift']
    record['variance_shift_at_init_blocks'] = cache[key]['variance_shift_blocks']


def table_rows(records: Sequence[dict], label: str) -> list[list]:
  """One row per norm x placement x rate: accuracies and variance shifts over the seeds."""
  rows = []
  keys = dict.fromkeys((r['config']['norm'], r['config']['dropout_placement'], r['config']['dropout_rate'])
                       for r in records)
  for norm, placement, rate in keys:
    runs = matching(records, norm=norm, dropout_placement=placement, dropout_rate=rate)
    rows.append([label, norm, placement, f'{rate:g}' if placement != 'none' else '-',
                 cell([r.get('test_accuracy_moving_stats') for r in runs]),
                 cell([r.get('test_accuracy_batch_stats') for r in runs]) if norm != 'none' else '-',
                 f"{runs[0]['variance_shift_at_init']:.3f}", cell([r.get('variance_shift') for r in runs], 3),
                 cell([r.get('moving_variance_ratio') for r in runs], 3) if norm != 'none' else '-'])
  return rows


def bn_bars(records: Sequence[dict], placements: Sequence[str]) -> dict:
  """A model's panel of `plots.plot_dropout_bars`: its BN runs' accuracy and variance shift per rate and placement."""
  bn = [r for r in records if r['config']['norm'] != 'none']
  rates = sorted({r['config']['dropout_rate'] for r in bn if r['config']['dropout_placement'] != 'none'})

  def stats(metric, rate):
    at = [matching(bn, dropout_placement=p, dropout_rate=rate if p != 'none' else 0.0) for p in placements]
    return [report_lib.mean_std([r.get(metric) for r in runs])[:2] for runs in at]

  accuracies = [r.get('test_accuracy_moving_stats') or 0 for r in bn]
  return {'accuracy': {rate: stats('test_accuracy_moving_stats', rate) for rate in rates},
          'shift': {rate: stats('variance_shift', rate) for rate in rates},
          'accuracy_range': (min(accuracies), max(accuracies))}


def run(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  from bnjax.lab import plots

  parts = {}
  mnist = TrainConfig(**MNIST, scaling='unit', batch_size=500, epochs=settings['mlp_epochs'], data_dir=data_dir)
  grid = settings['placements'], settings['rates']
  parts['mnist_mlp (MNIST)'] = sweep_records(dropout_configs(mnist, *grid, ('none', 'bn'), settings['seeds']),
                                            out / 'sweep_mlp', log)
  if settings['cnn_epochs']:
    cifar = TrainConfig(**{**CIFAR, 'epochs': settings['cnn_epochs'], 'data_dir': data_dir})
    parts['cifar_cnn (CIFAR-10)'] = sweep_records(dropout_configs(cifar, *grid, ('bn',), settings['cnn_seeds']),
                                                 out / 'sweep_cnn', log)
  for records in parts.values():
    add_shift_at_init(records)
  rows = [row for label, records in parts.items() for row in table_rows(records, label)]
  table = markdown_table(['model', 'norm', 'dropout', 'rate', 'test acc (moving stats)', 'test acc (batch stats)',
                          'variance shift at init', 'variance shift, trained', 'moving var / inference var'], rows)
  plots.plot_dropout_bars({label: bn_bars(records, settings['placements']) for label, records in parts.items()},
                          settings['placements'], out / 'dropout.png')
  return {'table': table, 'results': {label: [{k: r.get(k) for k in RECORD_KEYS} for r in records]
                                      for label, records in parts.items()}}


STUDY = Study('repro_dropout', 'Dropout placement (none, before_norm, after_norm, end) x rate 0.2 / 0.5: accuracy '
              'and variance shift, MNIST MLP and CIFAR-10 CNN.', run,
              {'cpu': dict(placements=list(PLACEMENTS), rates=[0.2, 0.5], mlp_epochs=10, seeds=[0, 1, 2],
                           cnn_epochs=2, cnn_seeds=[0]),
               'full': dict(placements=list(PLACEMENTS), rates=[0.2, 0.5], mlp_epochs=20, seeds=[0, 1, 2],
                            cnn_epochs=30, cnn_seeds=[0, 1, 2])})
