"""Tests for bnjax.linen: the modules equal the pure functions they wrap, and flax.linen.BatchNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax.linen import BatchNorm, BatchRenorm, norm_state

C = 5


def _x(seed=0, shape=(8, C)):
  return 3.0 * jax.random.normal(jax.random.key(seed), shape) + 1.5


def _random_state(module, x):
  """The module's variables with non-trivial params and moving statistics."""
  variables = module.init(jax.random.key(0), x, use_running_average=True)
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [
      leaf if leaf.ndim == 0 else leaf + 0.5 * jnp.abs(jax.random.normal(k, leaf.shape))
      for leaf, k in zip(leaves, keys)
  ]
  return jax.tree.unflatten(treedef, leaves)


# kind -> (module, pure init, pure function, options for both)
KINDS = {
    'bn': (BatchNorm, bnjax.batch_norm, dict(momentum=0.9, epsilon=1e-3)),
    'ghost': (BatchNorm, bnjax.batch_norm, dict(momentum=0.8, epsilon=1e-2, virtual_batch_size=4)),
    'renorm': (
        BatchRenorm, bnjax.batch_renorm,
        dict(momentum=0.9, renorm_momentum=0.7, rmax=1.5, dmax=0.5, epsilon=1e-3),
    ),
    'renorm_ghost_debias': (
        BatchRenorm, bnjax.batch_renorm,
        dict(momentum=0.95, rmax=2.0, dmax=1.0, virtual_batch_size=2, debias=True),
    ),
}


def _pure_call(pure, variables, x, training, options, mask=None):
  state = norm_state(variables['batch_stats'])
  return pure(x, variables['params'], state, training=training, mask=mask, **options)


@pytest.mark.parametrize('kind', list(KINDS))
@pytest.mark.parametrize('training', [True, False])
def test_module_equals_pure_function(kind, training):
  module_type, pure, options = KINDS[kind]
  module = module_type(**options)
  x = _x(shape=(8, 3, C))
  mask = jnp.arange(8) < 6
  variables = _random_state(module, x)
  y, updates = module.apply(variables, x, use_running_average=not training, mask=mask, mutable=['batch_stats'])
  y_ref, state_ref = _pure_call(pure, variables, x, training, options, mask)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), norm_state(updates['batch_stats']), state_ref
  )
  assert int(updates['batch_stats']['step']) == int(training)


@pytest.mark.parametrize('kind', ['bn', 'renorm'])
def test_gradient_equals_pure_function(kind):
  module_type, pure, options = KINDS[kind]
  module = module_type(**options)
  x = _x()
  variables = _random_state(module, x)

  def module_loss(params, x):
    y, _ = module.apply({**variables, 'params': params}, x, use_running_average=False, mutable=['batch_stats'])
    return jnp.sum(jnp.sin(y))

  def pure_loss(params, x):
    y, _ = _pure_call(pure, {**variables, 'params': params}, x, True, options)
    return jnp.sum(jnp.sin(y))

  got = jax.grad(module_loss, argnums=(0, 1))(variables['params'], x)
  want = jax.grad(pure_loss, argnums=(0, 1))(variables['params'], x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def test_matches_flax_linen_batchnorm():
  ours = BatchNorm(momentum=0.9, epsilon=1e-5)
  theirs = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
  x0 = _x(shape=(6, 4, C))
  v_ours = ours.init(jax.random.key(0), x0, use_running_average=False)
  v_theirs = theirs.init(jax.random.key(0), x0, use_running_average=False)
  # flax users find params and mean/var where flax keeps them.
  assert jax.tree.map(jnp.shape, v_theirs['params']) == jax.tree.map(jnp.shape, v_ours['params'])
  for key in ('mean', 'var'):
    assert v_ours['batch_stats'][key].shape == v_theirs['batch_stats'][key].shape
  for seed in range(3):
    x = _x(seed, (6, 4, C))
    y_ours, u_ours = ours.apply(v_ours, x, use_running_average=False, mutable=['batch_stats'])
    y_theirs, u_theirs = theirs.apply(v_theirs, x, use_running_average=False, mutable=['batch_stats'])
    np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-4, atol=1e-5)
    v_ours, v_theirs = {**v_ours, **u_ours}, {**v_theirs, **u_theirs}
    for key in ('mean', 'var'):
      np.testing.assert_allclose(v_ours['batch_stats'][key], v_theirs['batch_stats'][key], rtol=1e-5)
  x = _x(7, (6, 4, C))
  np.testing.assert_allclose(
      ours.apply(v_ours, x, use_running_average=True),
      theirs.apply(v_theirs, x, use_running_average=True),
      rtol=1e-5, atol=1e-6,
  )
  assert int(v_ours['batch_stats']['step']) == 3


def test_use_running_average_attribute_or_call_argument():
  x = _x()
  variables = _random_state(BatchNorm(), x)
  by_argument = BatchNorm().apply(variables, x, use_running_average=True)
  by_attribute = BatchNorm(use_running_average=True).apply(variables, x)
  np.testing.assert_array_equal(by_argument, by_attribute)
  with pytest.raises(ValueError, match='use_running_average'):
    BatchNorm().apply(variables, x)


def test_init_leaves_the_state_at_its_start_and_ignores_axis_name():
  # As flax.linen.BatchNorm: init in training mode, outside the mapped axis, updates nothing.
  variables = BatchNorm(axis_name='batch').init(jax.random.key(0), _x(), use_running_average=False)
  _, state = bnjax.batch_norm_init(C)
  jax.tree.map(np.testing.assert_array_equal, norm_state(variables['batch_stats']), state)


def test_training_needs_mutable_batch_stats():
  x = _x()
  variables = _random_state(BatchNorm(), x)
  with pytest.raises(Exception, match='batch_stats'):
    BatchNorm().apply(variables, x, use_running_average=False)


def test_momentum_schedule_is_called_with_the_stored_step():
  # Momentum 0 at step 0 (copy the batch), then 0.5.
  schedule = lambda step: jnp.where(step == 0, 0.0, 0.5)
  module = BatchNorm(momentum=schedule)
  variables = module.init(jax.random.key(0), _x(), use_running_average=False)
  x1, x2 = _x(1), _x(2)
  _, updates = module.apply(variables, x1, use_running_average=False, mutable=['batch_stats'])
  np.testing.assert_allclose(updates['batch_stats']['mean'], x1.mean(0), rtol=1e-6)
  _, updates = module.apply({**variables, **updates}, x2, use_running_average=False, mutable=['batch_stats'])
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.5 * x1.mean(0) + 0.5 * x2.mean(0), rtol=1e-6)
  assert int(updates['batch_stats']['step']) == 2


def test_renorm_clipping_schedules_start_as_batch_norm():
  rmax, dmax = bnjax.renorm_clipping_warmup(warmup_steps=10, rmax_end_step=20, dmax_end_step=20)
  module = BatchRenorm(rmax=rmax, dmax=dmax)
  x = _x()
  variables = _random_state(module, x)  # renorm statistics far from the batch's: r, d would matter
  y, _ = module.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
  y_bn, _ = bnjax.batch_norm(x, variables['params'], bnjax.batch_norm_init(C)[1], training=True)
  np.testing.assert_allclose(y, y_bn, rtol=1e-5, atol=1e-6)
  late = jax.tree.map(lambda a: a, variables)
  late['batch_stats']['step'] = jnp.asarray(30, jnp.int32)
  y_late, _ = module.apply(late, x, use_running_average=False, mutable=['batch_stats'])
  assert np.max(np.abs(y_late - y_bn)) > 1e-2


@pytest.mark.parametrize('module_type', [BatchNorm, BatchRenorm])
def test_vmap_over_momentum_values(module_type):
  x = _x()
  variables = _random_state(module_type(), x)
  momentums = jnp.array([0.0, 0.5, 0.9])

  def run(momentum, variables):
    module = module_type(momentum=momentum)
    return module.apply(variables, x, use_running_average=False, mutable=['batch_stats'])

  stacked = jax.tree.map(lambda a: jnp.stack([a] * len(momentums)), variables)
  ys, updates = jax.jit(jax.vmap(run))(momentums, stacked)
  for k, momentum in enumerate(momentums.tolist()):
    y, update = run(momentum, variables)
    np.testing.assert_allclose(ys[k], y, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[k], b, rtol=1e-5, atol=1e-6), updates, update)


def test_axis_name_gives_global_batch_statistics():
  module = BatchNorm(momentum=0.9, axis_name='devices')
  x = _x(shape=(4, 6, C))  # 4 "devices" of 6 examples
  variables = module.init(jax.random.key(0), x[0], use_running_average=False)
  ys, updates = jax.vmap(
      lambda xi: module.apply(variables, xi, use_running_average=False, mutable=['batch_stats']),
      axis_name='devices',
  )(x)
  y_ref, state_ref = bnjax.batch_norm(
      x.reshape(24, C), variables['params'], norm_state(variables['batch_stats']), training=True, momentum=0.9
  )
  np.testing.assert_allclose(ys.reshape(24, C), y_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['var'][0], state_ref.var, rtol=1e-5)


def test_center_scale_off_and_axis():
  x = _x(shape=(4, C, 3))
  variables = BatchNorm(center=False, scale=False, axis=1).init(jax.random.key(0), x, use_running_average=False)
  assert 'params' not in variables
  assert variables['batch_stats']['mean'].shape == (C,)
  with pytest.raises(ValueError, match='axis=3'):
    BatchNorm(axis=3).init(jax.random.key(0), x, use_running_average=False)


def test_norm_state_rejects_other_statistics():
  with pytest.raises(ValueError, match='missing'):
    norm_state({'mean': jnp.zeros(3), 'var': jnp.ones(3)})
