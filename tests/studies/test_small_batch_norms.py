"""The small_batch_norms study: every kind of normalization at every ghost size, end to end at a tiny budget."""

from bnjax.lab import config as config_lib
from bnjax.lab.studies.small_batch_norms import small_batch_configs
from tiny_study import run_tiny


def test_small_batch_configs_cover_every_kind_at_every_ghost_size():
  base = config_lib.make(dict(batch_size=32, steps=200))
  configs = small_batch_configs(base, [4, 32], seeds=[0, 1], epochs=4, freeze_epochs=1)
  kinds = {(c.norm, c.virtual_batch_size, c.freeze_bn_after) for c in configs}
  assert kinds == {('none', None, None), ('group', None, None), ('layer', None, None), ('ghost', 4, None),
                   ('bn', None, None), ('renorm', 4, None), ('renorm', 32, None), ('ghost', 4, 3), ('bn', None, 3)}
  assert len(configs) == 2 * len(kinds) and {c.seed for c in configs} == {0, 1}
  assert all(c.precise_bn == 10_000 for c in configs if c.freeze_bn_after)  # frozen with precise statistics
  # Renorm's clipping warm-up scales to the run's 200 steps.
  assert all(c.renorm_clipping == 'warmup' and c.rmax_end_step == 200 for c in configs if c.norm == 'renorm')
  # No frozen BN when the run is no longer than the frozen part.
  assert not any(c.freeze_bn_after for c in small_batch_configs(base, [4], [0], epochs=1, freeze_epochs=1))


def test_compares_every_kind(tmp_path, study_data_dir):
  results, out = run_tiny('small_batch_norms', tmp_path, study_data_dir, batch_size=100, ghost_sizes=[4],
                          mlp_epochs=2, seeds=[0], cnn_epochs=0, freeze_epochs=1)
  kinds = {(r['config']['norm'], bool(r['config']['freeze_bn_after'])) for r in results['results']['MNIST MLP']}
  assert kinds == {('none', False), ('group', False), ('layer', False), ('ghost', False), ('renorm', False),
                   ('ghost', True)}
  for kind in ('frozen BN', 'group norm', 'layer norm', 'renorm'):
    assert f'| {kind} |' in results['table']
  assert (out / 'small_batch_norms.png').exists()
