"""The repro_renorm study: renorm with the paper's clipping schedule over ghost batches, against ghost BN."""

from tiny_study import run_tiny


def test_renorm_uses_the_papers_clipping_schedule_over_ghost_batches(tmp_path, study_data_dir):
  results, out = run_tiny('repro_renorm', tmp_path, study_data_dir, epochs=1, seeds=[0], ghost_sizes=[2, 10],
                          batch_size=50)
  configs = [r['config'] for r in results['results']]
  renorm = [c for c in configs if c['norm'] == 'renorm']
  assert {c['virtual_batch_size'] for c in renorm} == {2, 10}
  assert all(c['renorm_clipping'] == 'warmup' and c['rmax_end_step'] == c['steps'] == 100 for c in renorm)
  assert {c['virtual_batch_size'] for c in configs if c['norm'] == 'ghost'} == {2, 10}
  assert all(r['test_accuracy_moving_stats'] is not None for r in results['results'])
  assert (out / 'renorm.png').exists()
