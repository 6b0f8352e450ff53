"""bnjax.lab.population: the precise-BN, frozen-BN and small-batch studies end to end at a tiny budget."""

import json

from bnjax.lab import studies

QUIET = lambda message: None


def _run(name, tmp_path, data_dir, **overrides):
  results = studies.run_study(name, tmp_path, overrides=overrides, data_dir=data_dir, log=QUIET)
  out = tmp_path / name
  assert json.loads((out / 'results.json').read_text())['table'] == results['table']
  return results, out


def test_precise_vs_ema_has_both_heatmaps_and_repairs_the_bug(tmp_path, study_data_dir):
  results, out = _run('precise_vs_ema', tmp_path, study_data_dir, epochs=1, seeds=[0], momenta=[0.9],
                      batch_sizes=[100, 1000], precise_examples=1000)
  assert (out / 'precise_vs_ema_ema.png').exists() and (out / 'precise_vs_ema_precise.png').exists()
  records = results['results']
  assert all(r['test_accuracy_precise_stats'] is not None for r in records)
  # BN momentum doesn't change training: with precise statistics every momentum of a batch size is the same run.
  at_100 = {r['test_accuracy_precise_stats'] for r in records
            if r['config']['batch_size'] == 100 and r['config']['update_stats']}
  assert len(at_100) == 1
  bug = [r for r in records if not r['config']['update_stats']]
  assert bug and all(r['test_accuracy_precise_stats'] > r['test_accuracy_moving_stats'] + 0.1 for r in bug)
  assert '--update_stats=false' in results['table']


def test_precise_examples_curve(tmp_path, study_data_dir):
  results, out = _run('precise_examples', tmp_path, study_data_dir, mlp_epochs=1, cnn_epochs=1,
                      examples=[100, 1000])
  curves = results['results']['curves']
  assert list(curves['MNIST MLP, batch 500']) == ['100', '1000', '5000']
  assert list(curves['CIFAR-10 CNN, batch 32']) == ['96']  # 3 batches of 32 out of 98 training examples
  assert (out / 'precise_examples.png').exists()


def test_small_batch_norms_compares_every_kind(tmp_path, study_data_dir):
  results, out = _run('small_batch_norms', tmp_path, study_data_dir, batch_size=32, ghost_sizes=[4, 32], mlp_epochs=2,
                      seeds=[0], cnn_epochs=0, freeze_epochs=1)
  kinds = {(r['config']['norm'], bool(r['config']['freeze_bn_after'])) for r in results['results']['MNIST MLP']}
  assert kinds == {('none', False), ('group', False), ('layer', False), ('ghost', False), ('bn', False),
                   ('renorm', False), ('ghost', True), ('bn', True)}
  for kind in ('frozen BN', 'group norm', 'layer norm', 'renorm'):
    assert f'| {kind} |' in results['table']
  assert (out / 'small_batch_norms.png').exists()
