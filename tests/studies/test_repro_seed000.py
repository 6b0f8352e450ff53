"""The repro_seed000 study: BN momentum changes the moving statistics, never what batch statistics see."""

import pytest

from tiny_study import run_tiny


def test_momentum_changes_moving_but_not_batch_statistics(tmp_path, study_data_dir):
  results, out = run_tiny('repro_seed000', tmp_path, study_data_dir, epochs=2, seeds=[0])
  runs = results['results']
  assert list(runs) == ['plain', 'bn (momentum 0.99)', 'bn (momentum 0.9)', 'bn (momentum 0.6)']
  # Training normalizes with batch statistics: the momentum only changes the moving averages.
  batch = [runs[name]['test_accuracy_batch_stats'][0] for name in list(runs)[1:]]
  assert batch[0] == pytest.approx(batch[1], abs=1e-6) and batch[0] == pytest.approx(batch[2], abs=1e-6)
  moving = [runs[name]['test_accuracy'][0] for name in list(runs)[1:]]
  assert len(set(moving)) > 1
  assert [m['epoch'] for m in runs['plain']['mean_history']] == [1, 2]
  assert (out / 'seed000_curves.png').stat().st_size > 10_000 and (out / 'seed000_momentum.png').exists()
  assert '0.9793 ± 0.0007' in results['table']  # the source's reference beside ours
