"""The report from a hand-written results.csv: aggregates over seeds, tables, the plots it should make."""

from __future__ import annotations

import csv
import json

import pytest

from bnjax.lab import report, sweep
from bnjax.lab.config import TrainConfig


def write_results(path, runs):
  """results.csv with the sweep's columns; `runs`: (overrides, test accuracy, status, curve)."""
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=sweep.RESULT_COLUMNS)
    writer.writeheader()
    for index, (overrides, accuracy, status, curve) in enumerate(runs):
      config = TrainConfig(**overrides)
      writer.writerow({**config.to_dict(), 'run_id': f'r{index}', 'group_id': 'g', 'status': status,
                       'test_accuracy_moving_stats': '' if accuracy is None else accuracy,
                       'test_accuracy_batch_stats': '' if accuracy is None else accuracy + 0.01,
                       'stats_gap': '' if accuracy is None else 0.01,
                       sweep.CURVE_COLUMN: json.dumps(curve)})
  return path


def test_aggregate_mean_std_over_seeds():
  rows = [dict(momentum=0.9, momentum_schedule='constant', batch_size=32, a=v) for v in (0.8, 0.9)]
  rows += [dict(momentum=0.99, momentum_schedule='inverse_decay', batch_size=32, a=0.5),
           dict(momentum=0.99, momentum_schedule='inverse_decay', batch_size=32, a=None)]
  table = report.aggregate(rows, ['batch_size', 'momentum'], 'a')
  assert table[(32, '0.9')] == pytest.approx((0.85, 0.05, 2))
  assert table[(32, 'inverse_decay')] == pytest.approx((0.5, 0.0, 1))


def test_report_heatmap_bars_curves(tmp_path):
  runs = []
  for batch in (4, 500):
    for momentum in (0.6, 0.9):
      for seed in (0, 1):
        runs.append((dict(batch_size=batch, momentum=momentum, seed=seed), 0.5 + momentum / 10 + seed / 100, 'completed',
                     [0.3, 0.5]))
    runs.append((dict(batch_size=batch, momentum_schedule='inverse_decay'), 0.7, 'completed', [0.4, 0.6]))
    runs.append((dict(batch_size=batch, norm='renorm'), 0.8, 'completed', [0.5, 0.8]))
    runs.append((dict(batch_size=batch, dropout_placement='end', dropout_rate=0.5), None, 'diverged', []))
  path = write_results(tmp_path / 'results.csv', runs)
  md = report.write_report(path, command='python experiments/sweep.py --x', log=lambda _: None).read_text()
  for png in ('heatmap_momentum_batch.png', 'heatmap_stats_gap.png', 'dropout_norm.png', 'curves_small_batch.png'):
    assert (tmp_path / png).stat().st_size > 1000 and f']({png})' in md
  assert 'python experiments/sweep.py --x' in md
  assert '0.5650 ± 0.0050' in md  # batch 4, momentum 0.6, seeds 0 and 1
  assert '1 diverged' in md


def test_momentum_only_sweep_draws_a_line(tmp_path):
  runs = [(dict(momentum=m), 0.9, 'completed', [0.9]) for m in (0.6, 0.9)]
  md = report.write_report(write_results(tmp_path / 'results.csv', runs), log=lambda _: None).read_text()
  assert '(momentum.png)' in md and 'heatmap' not in md


def test_momentum_varies_only_among_norms_with_moving_statistics(tmp_path):
  # Group and layer norm keep no moving statistics: their (default) momentum is not a second value.
  runs = [(dict(momentum=0.9), 0.9, 'completed', [0.9])] + [(dict(norm=n), 0.8, 'completed', [0.8]) for n in
                                                             ('none', 'group', 'layer')]
  md = report.write_report(write_results(tmp_path / 'results.csv', runs), log=lambda _: None).read_text()
  assert 'momentum.png' not in md and 'heatmap' not in md
  assert report.has_moving_statistics({'norm': 'renorm'}) and not report.has_moving_statistics({'norm': 'group'})
