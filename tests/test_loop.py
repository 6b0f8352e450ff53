"""bnjax.lab.loop with bnjax.lab.programs: precise BN statistics, frozen BN, and the group/layer norm kinds."""

import jax
import numpy as np
import pytest

from bnjax.lab import build, loop, programs
from bnjax.lab import config as C


def _config(data_dir, **settings):
  return C.make(dict(dict(data_dir=str(data_dir), data_source='files', batch_size=100, epochs=2, progress_updates=1),
                     **settings))


@pytest.fixture(scope='module')
def dataset(data_dir):
  return build.dataset(_config(data_dir), put=jax.device_put)


def _train(config, dataset, outputs=loop.Outputs()):
  program = programs.single(config, dataset)
  result = loop.train(program, loop.Settings(progress=False, log=lambda m: None), outputs)
  return program, result, loop.summarize(program, result)[0]


def test_precise_statistics_are_the_population_statistics_of_the_first_norm_input(data_dir, dataset):
  program = programs.single(_config(data_dir, precise_bn=1000), dataset)
  indices = program.epoch_batches(program.state, 0)[: program.plan.precise_steps(program.configs[0])]
  assert indices.shape == (10, 100)
  state = program.precise(program.state, indices)
  images = np.asarray(dataset.train_images)[np.asarray(indices).reshape(-1)].reshape(1000, -1)
  dense = program.state.params['linear_0']
  first = images @ np.asarray(dense['kernel']) + np.asarray(dense['bias'])  # what norm_0 normalizes
  np.testing.assert_allclose(state.batch_stats['norm_0']['mean'], first.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state.batch_stats['norm_0']['var'], first.var(0), rtol=1e-3, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, state.params, program.state.params)


def test_precise_bn_repairs_the_moving_statistics_bug(data_dir, dataset):
  _, _, bug = _train(_config(data_dir, update_stats=False, precise_bn=1200), dataset)
  assert bug['test_accuracy_moving_stats'] < bug['test_accuracy_batch_stats'] - 0.1
  assert bug['test_accuracy_precise_stats'] > bug['test_accuracy_moving_stats'] + 0.1
  assert abs(bug['test_accuracy_precise_stats'] - bug['test_accuracy_batch_stats']) < 0.05
  assert bug['test_accuracy'] == bug['test_accuracy_precise_stats']  # validation and the headline use them


def test_frozen_bn_keeps_the_moving_statistics_and_trains_the_weights(data_dir, dataset):
  saved = {}
  checkpoint = lambda epoch, state, histories: saved.update({epoch: jax.tree.map(np.asarray, state)})
  _train(_config(data_dir, epochs=3, freeze_bn_after=1), dataset, loop.Outputs(checkpoint=checkpoint, checkpoint_every=1))
  jax.tree.map(np.testing.assert_array_equal, saved[1].batch_stats, saved[3].batch_stats)
  assert not np.allclose(saved[1].params['linear_0']['kernel'], saved[3].params['linear_0']['kernel'])
  # With --precise_bn the layers freeze with the population statistics of the weights at the freeze.
  saved.clear()
  _train(_config(data_dir, epochs=3, freeze_bn_after=1, precise_bn=500), dataset,
         loop.Outputs(checkpoint=checkpoint, checkpoint_every=1))
  jax.tree.map(np.testing.assert_array_equal, saved[2].batch_stats, saved[3].batch_stats)
  assert not np.allclose(saved[1].batch_stats['norm_0']['mean'], saved[2].batch_stats['norm_0']['mean'])


@pytest.mark.parametrize('norm, settings', [('group', dict(num_groups=8)), ('layer', {})])
def test_group_and_layer_norm_train_without_moving_statistics(data_dir, dataset, norm, settings):
  program, _, summary = _train(_config(data_dir, norm=norm, **settings), dataset)
  assert summary['status'] == 'completed' and summary['test_accuracy'] > 0.5
  assert summary['test_accuracy_batch_stats'] is None and not jax.tree.leaves(program.state.batch_stats)
  assert set(program.state.params['norm_0']) == {'scale', 'bias'}


INVALID = [
    (dict(norm='none', precise_bn=100), '--precise_bn=100 .*--norm=bn'),
    (dict(norm='layer', freeze_bn_after=1), '--freeze_bn_after=1 .*--norm=bn'),
    (dict(freeze_bn_after=2, epochs=2), '--freeze_bn_after=2 .*fewer than the --epochs=2'),
    (dict(norm='group', num_groups=3), '--norm=group cannot normalize the 256-feature layers .*--num_groups=3'),
    (dict(norm='group', model='mlp_bn_paper'), '--num_groups=32 does not divide 100'),
    (dict(norm='bn', num_groups=4), '--num_groups=4 .*--norm=group'),
]


@pytest.mark.parametrize('settings, message', INVALID, ids=[m for _, m in INVALID])
def test_bad_settings_name_the_flag_before_any_data_loads(settings, message):
  with pytest.raises(ValueError, match=message):
    C.make(settings)


def test_a_freeze_point_past_the_steps_of_a_run(data_dir, dataset):
  with pytest.raises(ValueError, match='--freeze_bn_after=5 .*fewer than the 2 epochs'):
    programs.single(_config(data_dir, steps=20, epochs=C.DEFAULTS.epochs, freeze_bn_after=5), dataset)


def test_every_steps_hook_and_the_fault_injection_come_from_the_settings(data_dir, dataset):
  program = programs.single(_config(data_dir, epochs=3), dataset)
  steps_per_epoch = program.plan.steps_per_epoch
  seen, saved = [], []
  settings = loop.Settings(progress=False, log=lambda m: None, interrupt_after_epoch=2,
                           every_steps=(steps_per_epoch // 2, lambda step, state: seen.append((step, int(state.step)))))
  outputs = loop.Outputs(checkpoint=lambda epoch, state, histories: saved.append(epoch), checkpoint_every=1)
  with pytest.raises(loop.Interrupted, match='after epoch 2'):
    loop.train(program, settings, outputs)
  assert saved == [1, 2]  # the checkpoint of the epoch comes before the interruption
  assert seen == [(step, step) for step in range(0, 2 * steps_per_epoch + 1, steps_per_epoch // 2)]
