"""bnjax.lab.diagnostics: the variance shift against its closed form and exact cases, percentiles, summaries."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.lab import diagnostics, models

WIDTHS = (('flatten',), ('dense', 32), ('dense', 16))


def _images(n=4096, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, 8, 8, 1)) + 0.5


def _init(model, images):
  return model.init(jax.random.PRNGKey(1), images[:2], train=False)


def test_without_dropout_or_norm_train_and_inference_agree_exactly():
  model = models.get('mnist_mlp', layers=WIDTHS, norm='none')
  images = _images(512)
  shift = diagnostics.variance_shift(model, _init(model, images), images, jax.random.PRNGKey(2))
  np.testing.assert_allclose(shift['train_over_eval'], 1.0, rtol=1e-6)
  assert shift['moving_over_eval'] is None


@pytest.mark.parametrize('rate', [0.2, 0.5])
def test_dropout_before_norm_shifts_the_variance_as_its_closed_form(rate):
  # Inverted dropout on z: Var_train = E[z^2] / (1 - p) - E[z]^2, against Var_eval = Var[z].
  model = models.get('mnist_mlp', layers=WIDTHS, norm='none', dropout_placement='before_norm', dropout_rate=rate)
  images = _images()
  variables = _init(model, images)
  shift = diagnostics.variance_shift(model, variables, images, jax.random.PRNGKey(3))
  block0 = diagnostics.probes(model, variables, images, train=False)['block_0']['norm_input']
  mean, var = np.asarray(block0['mean']), np.asarray(block0['var'])
  eps = model.epsilon
  expected = np.exp(np.mean(np.log(((var + mean**2) / (1 - rate) - mean**2 + eps) / (var + eps))))
  assert float(shift['train_over_eval'][0]) == pytest.approx(expected, rel=0.05)
  assert float(shift['train_over_eval'][0]) > 1.1


def test_dropout_at_the_end_leaves_every_norm_input_unshifted():
  model = models.get('mnist_mlp', layers=WIDTHS, norm='none', dropout_placement='end', dropout_rate=0.5)
  images = _images(512)
  shift = diagnostics.variance_shift(model, _init(model, images), images, jax.random.PRNGKey(4))
  np.testing.assert_allclose(shift['train_over_eval'], 1.0, rtol=1e-6)


def test_moving_statistics_of_the_same_batch_make_both_ratios_one():
  # Momentum 0: the moving statistics are the last batch's, so inference on that batch is training.
  model = models.get('mnist_mlp', layers=WIDTHS, norm='bn', momentum=0.0)
  images = _images(1024)
  variables = diagnostics.with_batch_statistics(model, _init(model, images), images)
  shift = diagnostics.variance_shift(model, variables, images, jax.random.PRNGKey(5))
  np.testing.assert_allclose(shift['train_over_eval'], 1.0, rtol=1e-4)
  np.testing.assert_allclose(shift['moving_over_eval'], 1.0, rtol=1e-4)


def test_stale_moving_variance_shows_in_the_moving_ratio():
  model = models.get('mnist_mlp', layers=WIDTHS, norm='bn', momentum=0.0)
  images = _images(1024)
  variables = diagnostics.with_batch_statistics(model, _init(model, images), images)
  stats = dict(variables['batch_stats'])
  stats['norm_1'] = dict(stats['norm_1'], var=stats['norm_1']['var'] * 4.0)
  shift = diagnostics.variance_shift(model, {'params': variables['params'], 'batch_stats': stats}, images,
                                     jax.random.PRNGKey(5))
  # Block 1's own input is unchanged at inference (block 0 is exact), its moving variance is 4x.
  assert float(shift['moving_over_eval'][1]) == pytest.approx(4.0, rel=0.01)
  assert float(shift['moving_over_eval'][0]) == pytest.approx(1.0, rel=1e-4)


def test_variance_shift_works_under_jit_and_vmap_over_runs():
  model = models.get('mnist_mlp', layers=WIDTHS, norm='bn', dropout_placement='before_norm', dropout_rate=0.5)
  images = _images(256)
  stacked = jax.vmap(lambda key: model.init(key, images[:2], train=False))(jax.random.split(jax.random.PRNGKey(0), 3))
  shifts = jax.jit(jax.vmap(lambda v, key: diagnostics.variance_shift(model, v, images, key)))(
      stacked, jax.random.split(jax.random.PRNGKey(1), 3))
  assert shifts['train_over_eval'].shape == (3, 2)
  assert bool(jnp.all(shifts['train_over_eval'] > 1.0))


def test_activation_percentiles_are_the_last_blocks_pre_activation_percentiles():
  model = models.get('mnist_mlp', layers=WIDTHS, norm='none', activation='sigmoid')
  images = _images(1000)
  variables = _init(model, images)
  got = diagnostics.activation_percentiles(model, variables, images, unit=3)
  _, state = model.apply(variables, images, capture_intermediates=True, mutable=['intermediates'])
  pre_activation = np.asarray(state['intermediates']['linear_1']['__call__'][0])[:, 3]
  np.testing.assert_allclose(got, np.percentile(pre_activation, [15, 50, 85]), rtol=1e-5, atol=1e-6)


def test_probe_examples_fill_whole_ghost_batches():
  images = jnp.zeros((1000, 4))
  assert diagnostics.probe_examples(images).shape[0] == 1000
  assert diagnostics.probe_examples(images, 32).shape[0] == 992
  assert diagnostics.probe_examples(jnp.zeros((5000, 4)), 3).shape[0] == 1023


def test_shift_summary_is_the_geometric_mean_over_blocks():
  summary = diagnostics.shift_summary({'train_over_eval': jnp.array([1.0, 4.0]), 'moving_over_eval': None})
  assert summary['variance_shift'] == pytest.approx(2.0)
  assert summary['variance_shift_blocks'] == [1.0, 4.0]
  assert summary['moving_variance_ratio'] is None and summary['moving_variance_ratio_blocks'] is None
  assert math.isfinite(summary['variance_shift'])
