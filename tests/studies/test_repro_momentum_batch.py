"""The repro_momentum_batch study: both heatmaps, and the gap of batch over moving statistics per run."""

import pytest

from tiny_study import run_tiny


def test_writes_both_heatmaps(tmp_path, study_data_dir):
  results, out = run_tiny('repro_momentum_batch', tmp_path, study_data_dir, epochs=1, seeds=[0], momenta=[0.6, 0.99],
                          batch_sizes=[50, 250])
  rows = results['results']['rows']
  assert len(rows) == 2 * 3  # batch sizes x (two momenta + inverse decay)
  assert all(r['stats_gap'] == pytest.approx(r['test_accuracy_batch_stats'] - r['test_accuracy_moving_stats'])
             for r in rows)
  assert (out / 'momentum_batch_accuracy.png').exists() and (out / 'momentum_batch_stats_gap.png').exists()
  assert 'momentum inverse_decay' in results['table']
