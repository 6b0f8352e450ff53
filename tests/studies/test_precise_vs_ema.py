"""The precise_vs_ema study: both heatmaps; precise statistics make BN momentum irrelevant and repair the bug."""

from tiny_study import run_tiny


def test_has_both_heatmaps_and_repairs_the_bug(tmp_path, study_data_dir):
  results, out = run_tiny('precise_vs_ema', tmp_path, study_data_dir, epochs=1, seeds=[0], momenta=[0.99],
                          batch_sizes=[500], precise_examples=1000)
  assert (out / 'precise_vs_ema_ema.png').exists() and (out / 'precise_vs_ema_precise.png').exists()
  records = results['results']
  assert all(r['test_accuracy_precise_stats'] is not None for r in records)
  # BN momentum doesn't change training: with precise statistics every momentum (constant 0.99, inverse decay)
  # of a batch size is the same run.
  updated = [r for r in records if r['config']['update_stats']]
  assert {r['config']['momentum_schedule'] for r in updated} == {'constant', 'inverse_decay'}
  assert len({r['test_accuracy_precise_stats'] for r in updated}) == 1
  bug = [r for r in records if not r['config']['update_stats']]
  assert bug and all(r['test_accuracy_precise_stats'] > r['test_accuracy_moving_stats'] + 0.1 for r in bug)
  assert '--update_stats=false' in results['table']
