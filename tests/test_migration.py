"""The README's migration notes from Haiku and Equinox, run against the libraries themselves.

Each test trains the other library's BatchNorm for a few steps, converts its parameters and statistics
the way the README says, and checks that bnjax then gives the same outputs (training and inference)
and the same moving statistics. Skipped where the library is not installed (it is in the `test` extra).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
import bnjax.linen


def _import_or_skip(name):
  try:
    return __import__(name)
  except Exception as error:  # an incompatible release can fail with more than ImportError
    pytest.skip(f'{name} unavailable: {error}')


def _batches(count, shape, seed=0):
  """`count` batches of `shape`, with a mean and scale far from 0 and 1 per feature."""
  keys = jax.random.split(jax.random.key(seed), count)
  return [3.0 * jax.random.normal(k, shape) + jnp.linspace(-2.0, 4.0, shape[-1]) for k in keys]


def test_haiku_checkpoint_converts_and_continues_exactly():
  hk = _import_or_skip('haiku')
  decay_rate, eps = 0.9, 1e-5
  batches = _batches(5, (16, 6))

  def forward(x, is_training):
    return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=decay_rate, eps=eps)(x, is_training)

  layer = hk.transform_with_state(forward)
  params, state = layer.init(jax.random.key(1), batches[0], True)
  params = jax.tree.map(lambda p: p + jax.random.uniform(jax.random.key(2), p.shape), params)
  for x in batches[:3]:
    _, state = layer.apply(params, state, None, x, True)

  # The README's conversion, verbatim.
  p, s = params['batch_norm'], state
  variables = {'params': {'scale': p['scale'].reshape(-1), 'bias': p['offset'].reshape(-1)},
               'batch_stats': {'mean': s['batch_norm/~/mean_ema']['average'].reshape(-1),
                               'var': s['batch_norm/~/var_ema']['average'].reshape(-1),
                               'decay_product': decay_rate ** s['batch_norm/~/mean_ema']['counter']}}
  bn = bnjax.linen.BatchNorm(momentum=decay_rate, epsilon=eps, debias=True)

  expected, _ = layer.apply(params, state, None, batches[3], False)
  got = bn.apply(variables, batches[3], use_running_average=True)
  np.testing.assert_allclose(got, expected, atol=2e-5)

  expected, state = layer.apply(params, state, None, batches[4], True)
  got, updates = bn.apply(variables, batches[4], use_running_average=False, mutable=['batch_stats'])
  np.testing.assert_allclose(got, expected, atol=2e-5)
  np.testing.assert_allclose(updates['batch_stats']['mean'],
                             state['batch_norm/~/mean_ema']['average'].reshape(-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['var'],
                             state['batch_norm/~/var_ema']['average'].reshape(-1), rtol=1e-5)


def _equinox_steps(eqx, layer, state, batches):
  run = jax.vmap(layer, axis_name='batch', in_axes=(0, None), out_axes=(0, None))
  outputs = []
  for x in batches:
    y, state = run(x, state)
    outputs.append(y)
  return outputs, state


def test_equinox_batch_mode_converts_and_continues_exactly():
  eqx = _import_or_skip('equinox')
  momentum, eps = 0.9, 1e-5
  batches = _batches(5, (8, 3, 4))                     # then [N, C, L]: equinox is channels-first
  batches = [jnp.swapaxes(x, 1, 2) for x in batches]
  layer, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(4, 'batch', eps=eps, momentum=momentum, mode='batch')
  layer = eqx.tree_at(lambda m: (m.weight, m.bias), layer, (jnp.arange(1.0, 5.0), jnp.arange(4.0)))
  eqx_outputs, state = _equinox_steps(eqx, layer, state, batches[:3])

  # The README's conversion of mode='batch': the hidden averages over (1 - momentum ** counter).
  counter = state.get(layer.batch_counter)
  hidden_mean, hidden_var = state.get(layer.batch_state_index)
  params = {'scale': layer.weight, 'bias': layer.bias}
  bn_state = bnjax.batch_norm_init(4)[1]._replace(
      mean=hidden_mean / (1 - momentum ** counter), var=hidden_var / (1 - momentum ** counter),
      decay_product=jnp.asarray(momentum ** counter, jnp.float32))
  options = dict(axis=1, epsilon=eps, momentum=momentum, debias=True)

  inference = jax.vmap(lambda x, s: layer(x, s, inference=True), axis_name='batch', in_axes=(0, None),
                       out_axes=(0, None))
  expected, _ = inference(batches[3], state)
  got, _ = bnjax.batch_norm(batches[3], params, bn_state, training=False, **options)
  np.testing.assert_allclose(got, expected, atol=2e-5)

  (expected,), state = _equinox_steps(eqx, layer, state, batches[4:])
  got, bn_state = bnjax.batch_norm(batches[4], params, bn_state, training=True, **options)
  np.testing.assert_allclose(got, expected, atol=2e-5)
  expected, _ = inference(batches[3], state)
  got, _ = bnjax.batch_norm(batches[3], params, bn_state, training=False, **options)
  np.testing.assert_allclose(got, expected, atol=2e-5)


def test_equinox_ema_mode_moving_statistics_match_with_the_first_step_copying_the_batch():
  eqx = _import_or_skip('equinox')
  momentum = 0.9
  batches = _batches(4, (8, 4))
  layer, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(4, 'batch', momentum=momentum, mode='ema')
  _, state = _equinox_steps(eqx, layer, state, batches)

  params, bn_state = bnjax.batch_norm_init(4)
  schedule = lambda step: jnp.where(step == 0, 0.0, momentum)  # the README's schedule
  for x in batches:
    _, bn_state = bnjax.batch_norm(x, params, bn_state, training=True, momentum=schedule, epsilon=1e-5)
  mean, var = state.get(layer.ema_state_index)
  np.testing.assert_allclose(bn_state.mean, mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bn_state.var, var, rtol=1e-5)
  inference = jax.vmap(lambda x, s: layer(x, s, inference=True), axis_name='batch', in_axes=(0, None),
                       out_axes=(0, None))
  expected, _ = inference(batches[0], state)
  got, _ = bnjax.batch_norm(batches[0], params, bn_state, training=False, epsilon=1e-5)
  np.testing.assert_allclose(got, expected, atol=2e-5)
