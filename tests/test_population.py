"""bnjax.lab.population: the precise-BN, frozen-BN and small-batch studies end to end at a tiny budget."""

import json

from bnjax.lab import config as config_lib
from bnjax.lab import population, studies

QUIET = lambda message: None


def _run(name, tmp_path, data_dir, **overrides):
  results = studies.run_study(name, tmp_path, overrides=overrides, data_dir=data_dir, log=QUIET)
  out = tmp_path / name
  assert json.loads((out / 'results.json').read_text())['table'] == results['table']
  return results, out


def test_precise_vs_ema_has_both_heatmaps_and_repairs_the_bug(tmp_path, study_data_dir):
  results, out = _run('precise_vs_ema', tmp_path, study_data_dir, epochs=1, seeds=[0], momenta=[0.99],
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


def test_precise_examples_curve(tmp_path, study_data_dir):
  results, out = _run('precise_examples', tmp_path, study_data_dir, mlp_epochs=1, cnn_epochs=1,
                      examples=[100, 1000, 10_000])
  curves = results['results']['curves']
  # Whole batches: 100 examples are one batch of 500; 1000 two; 10^4 more than the 5000 there are.
  assert list(curves['MNIST MLP, batch 500']) == ['500', '1000', '5000']
  assert list(curves['CIFAR-10 CNN, batch 32']) == ['96']  # 3 batches of 32 out of 98 training examples
  assert (out / 'precise_examples.png').exists()


def test_small_batch_configs_cover_every_kind_at_every_ghost_size():
  base = config_lib.make(dict(batch_size=32, steps=200))
  configs = population.small_batch_configs(base, [4, 32], seeds=[0, 1], epochs=4, freeze_epochs=1)
  kinds = {(c.norm, c.virtual_batch_size, c.freeze_bn_after) for c in configs}
  assert kinds == {('none', None, None), ('group', None, None), ('layer', None, None), ('ghost', 4, None),
                   ('bn', None, None), ('renorm', 4, None), ('renorm', 32, None), ('ghost', 4, 3), ('bn', None, 3)}
  assert len(configs) == 2 * len(kinds) and {c.seed for c in configs} == {0, 1}
  assert all(c.precise_bn == 10_000 for c in configs if c.freeze_bn_after)  # frozen with precise statistics
  # Renorm's clipping warm-up scales to the run's 200 steps.
  assert all(c.renorm_clipping == 'warmup' and c.rmax_end_step == 200 for c in configs if c.norm == 'renorm')
  # No frozen BN when the run is no longer than the frozen part.
  assert not any(c.freeze_bn_after for c in population.small_batch_configs(base, [4], [0], epochs=1, freeze_epochs=1))


def test_small_batch_norms_compares_every_kind(tmp_path, study_data_dir):
  results, out = _run('small_batch_norms', tmp_path, study_data_dir, batch_size=100, ghost_sizes=[4], mlp_epochs=2,
                      seeds=[0], cnn_epochs=0, freeze_epochs=1)
  kinds = {(r['config']['norm'], bool(r['config']['freeze_bn_after'])) for r in results['results']['MNIST MLP']}
  assert kinds == {('none', False), ('group', False), ('layer', False), ('ghost', False), ('renorm', False),
                   ('ghost', True)}
  for kind in ('frozen BN', 'group norm', 'layer norm', 'renorm'):
    assert f'| {kind} |' in results['table']
  assert (out / 'small_batch_norms.png').exists()
