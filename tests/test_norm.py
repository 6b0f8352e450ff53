"""bnjax.norm against numpy formulas, flax.linen.BatchNorm and Keras 3's batch renorm."""

import os
import warnings

os.environ.setdefault('KERAS_BACKEND', 'jax')

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax

EPS = 1e-3
SHAPES = {'dense': (64, 16), 'nhwc': (8, 5, 5, 16)}


def _data(shape, seed=0, loc=0.5, scale=2.0):
  rng = np.random.default_rng(seed)
  return (rng.normal(loc, scale, shape)).astype(np.float32)


def _params(num_features, seed=1):
  rng = np.random.default_rng(seed)
  return {
      'scale': rng.uniform(0.5, 1.5, num_features).astype(np.float32),
      'bias': rng.normal(0, 0.5, num_features).astype(np.float32),
  }


# --- numpy reference: the formulas, in float64 ------------------------------


def np_batch_norm(x, scale, bias, eps=EPS):
  """The source material's `(x - mean(axis=0)) / sqrt(var(axis=0) + eps)`, over all but the last axis."""
  x = x.astype(np.float64)
  axes = tuple(range(x.ndim - 1))
  mean, var = x.mean(axes), x.var(axes)
  return scale * (x - mean) / np.sqrt(var + eps) + bias, mean, var


def np_batch_norm_grads(x, scale, dy, eps=EPS):
  """Ioffe & Szegedy 2015, section 3, the backward pass written out term by term."""
  x, dy = x.astype(np.float64), dy.astype(np.float64)
  axes = tuple(range(x.ndim - 1))
  m = np.prod([x.shape[a] for a in axes])
  mu, var = x.mean(axes), x.var(axes)
  x_hat = (x - mu) / np.sqrt(var + eps)
  dx_hat = dy * scale
  dvar = np.sum(dx_hat * (x - mu), axes) * -0.5 * (var + eps) ** -1.5
  dmu = np.sum(dx_hat * -1.0 / np.sqrt(var + eps), axes) + dvar * np.sum(-2.0 * (x - mu), axes) / m
  dx = dx_hat / np.sqrt(var + eps) + dvar * 2.0 * (x - mu) / m + dmu / m
  return dx, np.sum(dy * x_hat, axes), np.sum(dy, axes)


@pytest.mark.parametrize('layout', SHAPES)
def test_forward_and_gradients_match_numpy_formulas(layout):
  shape = SHAPES[layout]
  x, dy = _data(shape), _data(shape, seed=2, loc=0.0, scale=1.0)
  params = _params(shape[-1])
  _, state = bnjax.batch_norm_init(shape[-1])

  def loss(x, params):
    y, _ = bnjax.batch_norm(x, params, state, training=True, epsilon=EPS)
    return jnp.sum(y * dy), y

  (_, y), (dx, dparams) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, params)
  y_ref, _, _ = np_batch_norm(x, params['scale'], params['bias'])
  dx_ref, dscale_ref, dbias_ref = np_batch_norm_grads(x, params['scale'], dy)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dparams['scale'], dscale_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dparams['bias'], dbias_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('layout', SHAPES)
def test_moving_statistics_update_and_inference(layout):
  shape = SHAPES[layout]
  x = _data(shape)
  params, state = bnjax.batch_norm_init(shape[-1])
  _, state1 = bnjax.batch_norm(x, params, state, training=True, momentum=0.9)
  _, mean, var = np_batch_norm(x, 1.0, 0.0)
  np.testing.assert_allclose(state1.mean, 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state1.var, 0.9 + 0.1 * var, rtol=1e-5)
  assert int(state1.step) == 1
  # Inference normalizes with the moving statistics and leaves the state alone.
  y, state2 = bnjax.batch_norm(x, params, state1, training=False)
  assert state2 is state1
  expected = (x - np.asarray(state1.mean)) / np.sqrt(np.asarray(state1.var) + EPS)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_center_and_scale_off():
  x = _data((32, 8))
  params, state = bnjax.batch_norm_init(8, center=False, scale=False)
  assert params == {}
  y, _ = bnjax.batch_norm(x, params, state, training=True)
  y_ref, _, _ = np_batch_norm(x, 1.0, 0.0)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  params, _ = bnjax.batch_norm_init(8, center=True, scale=False)
  assert set(params) == {'bias'}


def test_init_values():
  params, state = bnjax.batch_norm_init(5, dtype=jnp.bfloat16)
  np.testing.assert_array_equal(params['scale'], np.ones(5))
  np.testing.assert_array_equal(params['bias'], np.zeros(5))
  assert params['scale'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(state.mean, np.zeros(5))
  np.testing.assert_array_equal(state.var, np.ones(5))
  assert state.mean.dtype == jnp.float32 and int(state.step) == 0


# --- flax.linen.BatchNorm as the oracle ---------------------------------------


@pytest.mark.parametrize('layout', SHAPES)
def test_equals_flax_linen_batch_norm_over_several_steps(layout):
  shape = SHAPES[layout]
  momentum = 0.9
  module = nn.BatchNorm(momentum=momentum, epsilon=EPS, use_fast_variance=False)
  params = _params(shape[-1])
  flax_vars = module.init(jax.random.key(0), jnp.zeros(shape), use_running_average=False)
  flax_stats = flax_vars['batch_stats']
  _, state = bnjax.batch_norm_init(shape[-1])
  dy = _data(shape, seed=9, loc=0.0, scale=1.0)

  def flax_loss(x, params, stats):
    y, updates = module.apply(
        {'params': params, 'batch_stats': stats}, x, use_running_average=False, mutable=['batch_stats']
    )
    return jnp.sum(y * dy), (y, updates['batch_stats'])

  def our_loss(x, params, state):
    y, new_state = bnjax.batch_norm(x, params, state, training=True, momentum=momentum, epsilon=EPS)
    return jnp.sum(y * dy), (y, new_state)

  flax_step = jax.jit(jax.value_and_grad(flax_loss, argnums=(0, 1), has_aux=True))
  our_step = jax.jit(jax.value_and_grad(our_loss, argnums=(0, 1), has_aux=True))
  for step in range(4):
    x = _data(shape, seed=10 + step, loc=step - 1.0, scale=1.0 + step)
    (_, (y_f, flax_stats)), grads_f = flax_step(x, params, flax_stats)
    (_, (y_o, state)), grads_o = our_step(x, params, state)
    np.testing.assert_allclose(y_o, y_f, rtol=1e-5, atol=1e-5)
    for g_o, g_f in zip(jax.tree.leaves(grads_o), jax.tree.leaves(grads_f)):
      np.testing.assert_allclose(g_o, g_f, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(state.mean, flax_stats['mean'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, flax_stats['var'], rtol=1e-5, atol=1e-6)
  x = _data(shape, seed=99)
  y_f = module.apply({'params': params, 'batch_stats': flax_stats}, x, use_running_average=True)
  y_o, _ = bnjax.batch_norm(x, params, state, training=False, epsilon=EPS)
  np.testing.assert_allclose(y_o, y_f, rtol=1e-5, atol=1e-5)


# --- batch renorm -------------------------------------------------------------


def test_renorm_with_rmax_1_dmax_0_is_batch_norm():
  x_steps = [_data((32, 8), seed=s, loc=s, scale=1 + s) for s in range(3)]
  params = _params(8)
  _, bn_state = bnjax.batch_norm_init(8)
  _, rn_state = bnjax.batch_renorm_init(8)
  for x in x_steps:
    y_bn, bn_state = bnjax.batch_norm(x, params, bn_state, training=True, momentum=0.9)
    y_rn, rn_state = bnjax.batch_renorm(x, params, rn_state, training=True, momentum=0.9, rmax=1.0, dmax=0.0)
    np.testing.assert_allclose(y_rn, y_bn, rtol=1e-5, atol=1e-5)
    grad_bn = jax.grad(lambda x: jnp.sum(bnjax.batch_norm(x, params, bn_state, training=True)[0] ** 3))(x)
    grad_rn = jax.grad(
        lambda x: jnp.sum(bnjax.batch_renorm(x, params, rn_state, training=True, rmax=1.0, dmax=0.0)[0] ** 3)
    )(x)
    np.testing.assert_allclose(grad_rn, grad_bn, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(rn_state.mean, bn_state.mean, rtol=1e-5, atol=1e-6)


def test_renorm_r_and_d_carry_no_gradient():
  x = _data((32, 8), loc=3.0, scale=4.0)
  params = _params(8)
  _, state = bnjax.batch_renorm_init(8)
  state = state._replace(renorm_mean=jnp.full(8, -2.5), renorm_std=jnp.full(8, 2.0))
  dy = _data((32, 8), seed=5, loc=0.0, scale=1.0)
  rmax, dmax = 1.2, 0.1

  def renorm_loss(x):
    return jnp.sum(bnjax.batch_renorm(x, params, state, training=True, rmax=rmax, dmax=dmax)[0] * dy)

  # The same output with r and d computed outside and held constant: the
  # gradient must be that of batch norm scaled by r.
  mu, sigma = x.mean(0), np.sqrt(x.var(0) + EPS)
  r = np.clip(sigma / 2.0, 1 / rmax, rmax)
  d = np.clip((mu + 2.5) / 2.0, -dmax, dmax)
  assert np.all(r == rmax) and np.all(np.abs(d) == dmax)  # both clipped: the test bites

  def const_loss(x):
    xm = x.mean(0)
    x_hat = (x - xm) / jnp.sqrt(x.var(0) + EPS)
    return jnp.sum((params['scale'] * (x_hat * r + d) + params['bias']) * dy)

  np.testing.assert_allclose(renorm_loss(x), const_loss(x), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(renorm_loss)(x), jax.grad(const_loss)(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('layout', SHAPES)
def test_renorm_matches_keras3_over_several_steps_and_in_inference(layout):
  keras = pytest.importorskip('keras')
  if keras.backend.backend() != 'jax':
    pytest.skip(f'keras runs on the {keras.backend.backend()} backend; the oracle needs KERAS_BACKEND=jax')
  shape = SHAPES[layout]
  momentum, renorm_momentum, rmax, dmax = 0.9, 0.8, 1.5, 0.5
  layer = keras.layers.BatchNormalization(
      momentum=momentum,
      epsilon=EPS,
      renorm=True,
      renorm_clipping={'rmax': rmax, 'rmin': 1 / rmax, 'dmax': dmax},
      renorm_momentum=renorm_momentum,
  )
  layer.build(shape)
  params = _params(shape[-1])
  layer.gamma.assign(params['scale'])
  layer.beta.assign(params['bias'])
  _, state = bnjax.batch_renorm_init(shape[-1])
  step = jax.jit(
      lambda x, state: bnjax.batch_renorm(
          x, params, state, training=True, momentum=momentum, renorm_momentum=renorm_momentum,
          epsilon=EPS, rmax=rmax, dmax=dmax,
      )
  )
  for i in range(5):
    x = _data(shape, seed=20 + i, loc=2.0 - i, scale=0.5 + i)
    y_keras = np.asarray(layer(x, training=True))
    y, state = step(x, state)
    np.testing.assert_allclose(y, y_keras, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(state.mean, layer.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.std, layer.moving_stddev.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.renorm_mean, layer.renorm_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.renorm_std, layer.renorm_stddev.numpy(), rtol=1e-5, atol=1e-6)
  x = _data(shape, seed=50, loc=1.0, scale=2.0)
  y, _ = bnjax.batch_renorm(x, params, state, training=False, epsilon=EPS)
  np.testing.assert_allclose(y, np.asarray(layer(x, training=False)), rtol=1e-4, atol=1e-4)


def test_renorm_schedules_are_called_with_the_step():
  rmax_schedule, dmax_schedule = bnjax.renorm_clipping_warmup(warmup_steps=2, rmax_end_step=4, dmax_end_step=4)
  x = _data((16, 4), loc=5.0, scale=3.0)
  params, state = bnjax.batch_renorm_init(4)
  _, bn_state = bnjax.batch_norm_init(4)
  for step in range(3):
    y, state = bnjax.batch_renorm(x, params, state, training=True, rmax=rmax_schedule, dmax=dmax_schedule)
    y_bn, bn_state = bnjax.batch_norm(x, params, bn_state, training=True)
    same = np.allclose(y, y_bn, atol=1e-5)
    # Steps 0-2 are the warm-up (rmax 1, dmax 0): plain batch norm.
    assert same, f'step {step}: renorm inside the warm-up should equal batch norm'
  y, state = bnjax.batch_renorm(x, params, state, training=True, rmax=rmax_schedule, dmax=dmax_schedule)
  y_bn, _ = bnjax.batch_norm(x, params, bn_state, training=True)
  assert not np.allclose(y, y_bn, atol=1e-3), 'after the warm-up, r and d must correct the output'


# --- ghost batch norm -----------------------------------------------------------


def test_ghost_batch_equal_to_the_batch_is_batch_norm():
  x = _data((32, 8))
  params = _params(8)
  _, state = bnjax.batch_norm_init(8)
  y, s1 = bnjax.batch_norm(x, params, state, training=True)
  y_ghost, s2 = bnjax.batch_norm(x, params, state, training=True, virtual_batch_size=32)
  np.testing.assert_allclose(y_ghost, y, rtol=1e-6, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, s1, s2)


@pytest.mark.parametrize('layout', SHAPES)
def test_ghost_batches_are_normalized_separately(layout):
  shape = SHAPES[layout]
  x = _data(shape, loc=1.0)
  x[: shape[0] // 2] += 5.0  # groups with very different statistics
  params = _params(shape[-1])
  _, state = bnjax.batch_norm_init(shape[-1])
  groups = 4
  size = shape[0] // groups
  y, new_state = bnjax.batch_norm(x, params, state, training=True, virtual_batch_size=size, momentum=0.0)
  means, variances = [], []
  for g in range(groups):
    part = x[g * size : (g + 1) * size]
    y_ref, mean, var = np_batch_norm(part, params['scale'], params['bias'])
    np.testing.assert_allclose(y[g * size : (g + 1) * size], y_ref, rtol=1e-4, atol=1e-4)
    means.append(mean)
    variances.append(var)
  # The moving statistics track the mean of the group statistics (momentum 0: exactly them).
  np.testing.assert_allclose(new_state.mean, np.mean(means, 0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_state.var, np.mean(variances, 0), rtol=1e-5)
  # Gradients flow per group: the loss of one group does not depend on the others.
  grad = jax.grad(
      lambda x: jnp.sum(bnjax.batch_norm(x, params, state, training=True, virtual_batch_size=size)[0][:size] ** 2)
  )(x)
  assert np.abs(np.asarray(grad[size:])).max() == 0.0


def test_ghost_renorm_uses_each_group():
  x = _data((16, 4), loc=2.0)
  params, state = bnjax.batch_renorm_init(4)
  y, _ = bnjax.batch_renorm(x, params, state, training=True, virtual_batch_size=8, rmax=1.0, dmax=0.0)
  _, bn_state = bnjax.batch_norm_init(4)
  y_ref, _ = bnjax.batch_norm(x, params, bn_state, training=True, virtual_batch_size=8)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


# --- momentum conventions -------------------------------------------------------


def test_cumulative_moving_average_with_momentum_none():
  params, state = bnjax.batch_norm_init(4)
  batch_means, batch_vars = [], []
  for s in range(5):
    x = _data((16, 4), seed=s, loc=s)
    _, state = bnjax.batch_norm(x, params, state, training=True, momentum=None)
    batch_means.append(x.mean(0))
    batch_vars.append(x.var(0))
  np.testing.assert_allclose(state.mean, np.mean(batch_means, 0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state.var, np.mean(batch_vars, 0), rtol=1e-5)


def test_momentum_schedule_gets_the_step():
  seen = []

  def schedule(step):
    seen.append(step)
    return jnp.where(step == 0, 0.0, 0.5)

  params, state = bnjax.batch_norm_init(4)
  x1, x2 = _data((16, 4), seed=1), _data((16, 4), seed=2)
  _, state = bnjax.batch_norm(x1, params, state, training=True, momentum=schedule)
  np.testing.assert_allclose(state.mean, x1.mean(0), rtol=1e-5, atol=1e-6)  # momentum 0: copy
  _, state = bnjax.batch_norm(x2, params, state, training=True, momentum=schedule)
  np.testing.assert_allclose(state.mean, 0.5 * x1.mean(0) + 0.5 * x2.mean(0), rtol=1e-5, atol=1e-6)
  assert [int(s) for s in seen] == [0, 1]


def test_debias_removes_the_initial_value():
  params, state = bnjax.batch_norm_init(4)
  x = _data((16, 4), loc=3.0)
  _, s1 = bnjax.batch_norm(x, params, state, training=True, momentum=0.99, debias=True)
  np.testing.assert_allclose(s1.mean, x.mean(0), rtol=1e-5)
  np.testing.assert_allclose(s1.var, x.var(0), rtol=1e-5)
  # Two steps: the debiased average weights the batches 0.99 : 1 (Adam's correction).
  x2 = _data((16, 4), seed=3, loc=-1.0)
  _, s2 = bnjax.batch_norm(x2, params, s1, training=True, momentum=0.99, debias=True)
  expected = (0.99 * 0.01 * x.mean(0) + 0.01 * x2.mean(0)) / (1 - 0.99**2)
  np.testing.assert_allclose(s2.mean, expected, rtol=1e-4, atol=1e-5)


# --- masks ------------------------------------------------------------------------


@pytest.mark.parametrize('layout', SHAPES)
def test_mask_excludes_padded_examples(layout):
  shape = SHAPES[layout]
  x = _data(shape)
  mask = np.arange(shape[0]) % 4 != 3
  x[~mask] = 1e6  # padding far from the data: any leak shows
  params = _params(shape[-1])
  _, state = bnjax.batch_norm_init(shape[-1])
  y, new_state = bnjax.batch_norm(x, params, state, training=True, mask=mask, momentum=0.0)
  y_ref, mean, var = np_batch_norm(x[mask], params['scale'], params['bias'])
  np.testing.assert_allclose(y[mask], y_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(new_state.mean, mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_state.var, var, rtol=1e-5)
  # Gradients of the valid outputs equal those of the unpadded batch.
  grad = jax.grad(
      lambda x: jnp.sum(jnp.where(mask.reshape((-1,) + (1,) * (len(shape) - 1)), bnjax.batch_norm(x, params, state, training=True, mask=mask)[0], 0) ** 2)
  )(x)
  grad_ref = jax.grad(lambda x: jnp.sum(bnjax.batch_norm(x, params, state, training=True)[0] ** 2))(x[mask])
  np.testing.assert_allclose(grad[mask], grad_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)


def test_mask_with_no_valid_example_keeps_the_state():
  params, state = bnjax.batch_norm_init(4)
  x = _data((8, 4))
  _, new_state = bnjax.batch_norm(x, params, state, training=True, mask=np.zeros(8, bool))
  np.testing.assert_array_equal(new_state.mean, state.mean)
  np.testing.assert_array_equal(new_state.var, state.var)


# --- numerics ---------------------------------------------------------------------


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_use_float32_statistics(dtype):
  x32 = _data((256, 8), loc=4.0, scale=3.0)
  x = jnp.asarray(x32, dtype)
  params, state = bnjax.batch_norm_init(8)
  y, new_state = bnjax.batch_norm(x, params, state, training=True, momentum=0.0)
  assert y.dtype == dtype
  assert new_state.mean.dtype == jnp.float32
  x_up = np.asarray(x, np.float32)
  np.testing.assert_allclose(new_state.mean, x_up.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_state.var, x_up.var(0), rtol=1e-4)
  y_ref, _, _ = np_batch_norm(x_up, 1.0, 0.0)
  np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, atol=0.05)


_FUNCTIONS = {'batch_norm': (bnjax.batch_norm, bnjax.batch_norm_init), 'batch_renorm': (bnjax.batch_renorm, bnjax.batch_renorm_init)}


def test_integer_input_is_normalized_as_float():
  x = np.arange(16).reshape(8, 2)  # column 0: 0, 2, ..., 14: mean 7, variance 21
  params, state = bnjax.batch_norm_init(2)
  y, _ = bnjax.batch_norm(x, params, state, training=True)
  y_ref, _, _ = np_batch_norm(x, 1.0, 0.0)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y[0, 0], -7 / np.sqrt(21 + EPS), rtol=1e-6)  # -1.5275, not int32's -1
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('dtype', [np.int32, np.int64, np.uint8, np.bool_])
@pytest.mark.parametrize('name', _FUNCTIONS)
def test_integer_and_bool_input_equals_the_float32_computation(name, dtype, training):
  fn, init = _FUNCTIONS[name]
  x = (np.arange(12 * 3).reshape(12, 3) * 7 % (2 if dtype == np.bool_ else 11)).astype(dtype)
  _, state = init(3)
  state = jax.tree.map(lambda a: a + 1 if a.ndim else a, state)  # moving statistics other than 0 and 1
  params = _params(3)
  y, new_state = fn(x, params, state, training=training, momentum=0.5)
  y_ref, state_ref = fn(x.astype(np.float32), params, state, training=training, momentum=0.5)
  assert y.dtype == jnp.float32
  np.testing.assert_array_equal(y, y_ref)
  jax.tree.map(np.testing.assert_array_equal, new_state, state_ref)
  # The state keeps its dtypes: float32 statistics, int32 step.
  assert [a.dtype for a in jax.tree.leaves(new_state)] == [a.dtype for a in jax.tree.leaves(state)]


@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('name', _FUNCTIONS)
def test_complex_input_is_rejected_with_a_clear_error(name, training):
  fn, init = _FUNCTIONS[name]
  params, state = init(4)
  x = jnp.ones((8, 4), jnp.complex64)
  with pytest.raises(ValueError, match=rf'{name}: x has dtype complex64; expected real numbers.*jnp.real\(x\)'):
    fn(x, params, state, training=training)


@pytest.mark.parametrize('call', ['eager', 'jit_argument', 'jit_closure'])
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('name', _FUNCTIONS)
def test_float64_numpy_input_emits_no_dtype_warning(name, training, call):
  if jax.config.jax_enable_x64:
    pytest.skip('float64 is available: nothing is truncated')
  fn, init = _FUNCTIONS[name]
  x = _data((16, 4)).astype(np.float64)
  params = {key: value.astype(np.float64) for key, value in _params(4).items()}
  _, state = init(4)
  run = lambda x: fn(x, params, state, training=training)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    if call == 'eager':
      y, new_state = run(x)
    elif call == 'jit_argument':
      y, new_state = jax.jit(run)(x)
    else:
      y, new_state = jax.jit(lambda: run(x))()
  assert not caught, [str(w.message) for w in caught]
  y_ref, state_ref = fn(x.astype(np.float32), _params(4), state, training=training)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new_state, state_ref)


def test_variance_is_exact_for_inputs_with_a_large_mean():
  rng = np.random.default_rng(0)
  x = (1e4 + rng.normal(0, 1, (512, 16))).astype(np.float32)
  params, state = bnjax.batch_norm_init(16)
  y, new_state = jax.jit(lambda x: bnjax.batch_norm(x, params, state, training=True, momentum=0.0))(x)
  exact_var = x.astype(np.float64).var(0)
  assert np.all(np.isfinite(y)) and np.all(new_state.var > 0)
  np.testing.assert_allclose(new_state.var, exact_var, rtol=1e-3)
  # The one-pass formula this guards against loses the variance entirely in float32.
  one_pass = np.mean(x * x, 0) - np.mean(x, 0) ** 2
  assert np.max(np.abs(one_pass - exact_var)) > 0.1


# --- transformations ----------------------------------------------------------------


def test_vmap_over_independent_parameter_and_state_sets():
  k = 3
  x = _data((32, 8))
  params, state = bnjax.batch_norm_init(8)
  stacked_params = jax.tree.map(lambda a: jnp.stack([a * (i + 1) for i in range(k)]), params)
  stacked_state = jax.tree.map(lambda a: jnp.stack([a] * k), state)
  ys, states = jax.jit(
      jax.vmap(lambda p, s: bnjax.batch_norm(x, p, s, training=True), in_axes=(0, 0))
  )(stacked_params, stacked_state)
  for i in range(k):
    p_i = jax.tree.map(lambda a: a[i], stacked_params)
    y_i, s_i = bnjax.batch_norm(x, p_i, state, training=True)
    np.testing.assert_allclose(ys[i], y_i, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(states.mean[i], s_i.mean, rtol=1e-6)


def test_vmap_over_momentum_values():
  momenta = jnp.array([0.0, 0.5, 0.9, 0.99])
  x = _data((32, 8))
  params, state = bnjax.batch_norm_init(8)

  def one(momentum):
    _, new_state = bnjax.batch_norm(x, params, state, training=True, momentum=momentum)
    _, new_state = bnjax.batch_norm(x + 1.0, params, new_state, training=True, momentum=momentum)
    return new_state

  states = jax.jit(jax.vmap(one))(momenta)
  for i, m in enumerate(np.asarray(momenta)):
    s = one(float(m))
    np.testing.assert_allclose(states.mean[i], s.mean, rtol=1e-6, atol=1e-7)
  # Renorm over its hyperparameters too.
  rparams, rstate = bnjax.batch_renorm_init(8)
  ys = jax.vmap(
      lambda rmax, dmax: bnjax.batch_renorm(x, rparams, rstate, training=True, rmax=rmax, dmax=dmax)[0]
  )(jnp.array([1.0, 3.0]), jnp.array([0.0, 5.0]))
  y_bn, _ = bnjax.batch_norm(x, params, state, training=True)
  np.testing.assert_allclose(ys[0], y_bn, rtol=1e-5, atol=1e-5)


def test_scan_over_steps_equals_a_python_loop():
  xs = jnp.stack([_data((16, 4), seed=s, loc=s) for s in range(6)])
  params, state = bnjax.batch_norm_init(4)
  schedule = bnjax.inverse_decay_momentum(max_momentum=0.95)

  def body(state, x):
    y, state = bnjax.batch_norm(x, params, state, training=True, momentum=schedule)
    return state, y

  final, ys = jax.lax.scan(body, state, xs)
  loop_state = state
  for i in range(6):
    loop_state, y = body(loop_state, xs[i])
    np.testing.assert_allclose(ys[i], y, rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), final, loop_state)
  assert int(final.step) == 6


def test_works_on_nchw_with_axis_1():
  x = _data((8, 6, 4, 4))
  params, state = bnjax.batch_norm_init(6)
  y, new_state = bnjax.batch_norm(x, params, state, training=True, axis=1, momentum=0.0)
  y_ref, mean, _ = np_batch_norm(np.moveaxis(x, 1, -1), 1.0, 0.0)
  np.testing.assert_allclose(np.moveaxis(np.asarray(y), 1, -1), y_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(new_state.mean, mean, rtol=1e-5, atol=1e-6)


# --- bad input ------------------------------------------------------------------------

_BAD = [
    (dict(x_shape=(8,)), 'rank'),
    (dict(num_features=5), 'features'),
    (dict(momentum=1.5), 'momentum=1.5'),
    (dict(momentum=-0.1), 'momentum=-0.1'),
    (dict(epsilon=0.0), 'epsilon=0.0'),
    (dict(epsilon=-1e-3), 'epsilon=-0.001'),
    (dict(virtual_batch_size=3), 'virtual_batch_size=3'),
    (dict(virtual_batch_size=0), 'virtual_batch_size=0'),
    (dict(axis=0), 'batch axis'),
    (dict(axis=5), 'axis=5'),
    (dict(mask=np.ones(7, bool)), 'mask'),
    (dict(training='yes'), 'training'),
]


@pytest.mark.parametrize('bad, message', _BAD, ids=[m for _, m in _BAD])
def test_bad_input_raises_a_clear_error(bad, message):
  bad = dict(bad)
  x = jnp.zeros(bad.pop('x_shape', (8, 4)))
  params, state = bnjax.batch_norm_init(bad.pop('num_features', 4))
  kwargs = dict(training=True)
  kwargs.update(bad)
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('.', r'\.')):
    bnjax.batch_norm(x, params, state, **kwargs)
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('.', r'\.')):
    rparams, rstate = bnjax.batch_renorm_init(params.get('scale', jnp.zeros(4)).shape[0])
    bnjax.batch_renorm(x, rparams, rstate, **kwargs)


@pytest.mark.parametrize('name, value', [('rmax', 0.5), ('dmax', -1.0), ('renorm_momentum', 2.0)])
def test_bad_renorm_clipping_raises(name, value):
  params, state = bnjax.batch_renorm_init(4)
  with pytest.raises(ValueError, match=f'{name}={value}'):
    bnjax.batch_renorm(jnp.zeros((8, 4)), params, state, training=True, **{name: value})


def test_bad_input_is_caught_at_trace_time_under_jit():
  params, state = bnjax.batch_norm_init(4)
  with pytest.raises(ValueError, match='virtual_batch_size=3'):
    jax.jit(lambda x: bnjax.batch_norm(x, params, state, training=True, virtual_batch_size=3))(jnp.zeros((8, 4)))


def test_params_of_the_wrong_size_are_rejected():
  params, state = bnjax.batch_norm_init(4)
  params = dict(params, scale=jnp.ones(3))
  with pytest.raises(ValueError, match=r"params\['scale'\] has shape \(3,\)"):
    bnjax.batch_norm(jnp.zeros((8, 4)), params, state, training=True)


_FIELDS = [
    (name, field)
    for name, (_, init) in _FUNCTIONS.items()
    for field in init(1)[1]._fields + ('scale', 'bias')
]


@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('name, field', _FIELDS, ids=[f'{n}-{f}' for n, f in _FIELDS])
def test_every_state_field_and_param_of_the_wrong_shape_gets_a_clear_error(name, field, training):
  fn, init = _FUNCTIONS[name]
  params, state = init(4)
  if field in params:
    params = dict(params, **{field: jnp.ones(3)})
    message = rf"{name}: params\['{field}'\] has shape \(3,\), expected \(4,\)"
  elif field in ('step', 'decay_product'):
    state = state._replace(**{field: jnp.zeros(2, getattr(state, field).dtype)})
    message = rf'{name}: state\.{field} has shape \(2,\), expected \(\)'
  else:
    state = state._replace(**{field: jnp.ones(3)})
    message = rf'{name}: state\.{field} has shape \(3,\), expected \(4,\).*{name}_init\(4\)'
  with pytest.raises(ValueError, match=message):
    fn(jnp.zeros((8, 4)), params, state, training=training)
  with pytest.raises(ValueError, match=message):  # at trace time
    jax.jit(lambda x: fn(x, params, state, training=training))(jnp.zeros((8, 4)))


def test_params_and_state_for_another_feature_size_say_so():
  params, state = bnjax.batch_norm_init(5)
  with pytest.raises(ValueError, match=r'x has 4 features on axis -1 \(shape \(8, 4\)\) but params and state have shape \(5,\).*batch_norm_init\(4\)'):
    bnjax.batch_norm(jnp.zeros((8, 4)), params, state, training=True)


def test_a_state_of_the_other_kind_is_rejected():
  params, state = bnjax.batch_norm_init(4)
  with pytest.raises(ValueError, match=r"batch_renorm: state is a BatchNormState without \['std', 'renorm_mean', 'renorm_std'\]; expected a BatchRenormState"):
    bnjax.batch_renorm(jnp.zeros((8, 4)), params, state, training=True)


def test_vmap_over_epsilon():
  x = _data((32, 8))
  params, state = bnjax.batch_norm_init(8)
  rparams, rstate = bnjax.batch_renorm_init(8)
  epsilons = jnp.array([1e-5, 1e-3, 1e-1])
  ys = jax.vmap(lambda e: bnjax.batch_norm(x, params, state, training=True, epsilon=e)[0])(epsilons)
  ys_renorm = jax.vmap(lambda e: bnjax.batch_renorm(x, rparams, rstate, training=True, epsilon=e)[0])(epsilons)
  for i, e in enumerate(np.asarray(epsilons)):
    y_ref, _, _ = np_batch_norm(x, 1.0, 0.0, eps=float(e))
    np.testing.assert_allclose(ys[i], y_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ys_renorm[i], bnjax.batch_renorm(x, rparams, rstate, training=True, epsilon=float(e))[0], rtol=1e-5, atol=1e-6)


def test_inference_accepts_any_batch_size_with_a_virtual_batch_size():
  params, state = bnjax.batch_norm_init(4)
  x = _data((3, 4))
  y, _ = bnjax.batch_norm(x, params, state, training=False, virtual_batch_size=8)
  np.testing.assert_allclose(y, x / np.sqrt(1 + EPS), rtol=1e-6)
  with pytest.raises(ValueError, match='virtual_batch_size=8'):
    bnjax.batch_norm(x, params, state, training=True, virtual_batch_size=8)


def test_renorm_state_can_be_donated():
  params, state = bnjax.batch_renorm_init(4)
  leaves = jax.tree.leaves(state)
  assert len({id(leaf) for leaf in leaves}) == len(leaves)
  step = jax.jit(lambda s, x: bnjax.batch_renorm(x, params, s, training=True)[1], donate_argnums=0)
  assert int(step(state, _data((8, 4))).step) == 1


@pytest.mark.parametrize('fn, init', [(bnjax.batch_norm, bnjax.batch_norm_init),
                                      (bnjax.batch_renorm, bnjax.batch_renorm_init)])
def test_training_on_one_value_per_feature_is_refused(fn, init):
  params, state = init(3)
  with pytest.raises(ValueError, match='1 value per feature'):
    fn(jnp.ones((1, 3)), params, state, training=True)
  with pytest.raises(ValueError, match='per ghost batch'):
    fn(jnp.ones((4, 3)), params, state, training=True, virtual_batch_size=1)
  # A single image has H * W values per channel; inference and masked batches are left alone.
  fn(jnp.ones((1, 2, 2, 3)), params, state, training=True)
  fn(jnp.ones((1, 3)), params, state, training=False)
  fn(jnp.ones((1, 3)), params, state, training=True, mask=jnp.ones((1,), bool))


def test_momentum_outside_0_1_is_an_error_eagerly_and_clipped_under_jit():
  params, state = bnjax.batch_norm_init(3)
  x = jax.random.normal(jax.random.key(0), (8, 3)) * 4
  overshoot = lambda step: 2.0
  with pytest.raises(ValueError, match=r'outside \[0, 1\]'):
    bnjax.batch_norm(x, params, state, training=True, momentum=overshoot)
  step = jax.jit(lambda s: bnjax.batch_norm(x, params, s, training=True, momentum=overshoot)[1])
  for _ in range(3):
    state = step(state)
  np.testing.assert_allclose(state.var, 1.0)  # momentum 1: the moving variance stays where it was, never negative
  _, state = bnjax.batch_norm(x, params, state, training=True, momentum=0.9)  # in range: untouched
