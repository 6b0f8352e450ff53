"""The repro_bug study: discarding the moving-statistics updates leaves training unchanged."""

import pytest

from bnjax.lab.studies import repro_bug
from tiny_study import run_tiny


def test_discarded_updates_leave_training_unchanged(tmp_path, study_data_dir):
  results, _ = run_tiny('repro_bug', tmp_path, study_data_dir, epochs=2, seeds=[0])
  runs = results['results']
  usual, bug = runs['BN before ReLU (the usual order)'], runs[list(runs)[1]]
  assert 'update_stats=false' in list(runs)[1]
  # Discarding the updates changes nothing in training, so batch-statistics evaluation is identical.
  assert bug['test_accuracy_batch_stats'] == pytest.approx(usual['test_accuracy_batch_stats'], abs=1e-6)
  assert len(results['table'].splitlines()) == 2 + len(repro_bug.MODELS)
