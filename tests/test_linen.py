"""Tests for bnjax.linen: the modules equal the pure functions they wrap, and flax.linen.BatchNorm."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax.linen import BatchNorm, BatchRenorm, norm_state, precise_batch_stats

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
        dict(momentum=0.95, rmax=2.0, dmax=1.0, virtual_batch_size=2, debias=True, epsilon=1e-3),
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
  for field, value in updates['batch_stats'].items():
    np.testing.assert_allclose(value, getattr(state_ref, field), rtol=1e-6)
  # Stored: the statistics, and decay_product with debias (no step: no schedule reads it).
  want_keys = set(variables['batch_stats'])
  assert want_keys == set(module_type._kind.state_type._fields) - {'step'} - ({'decay_product'} if 'debias' not in options else set())
  assert set(updates['batch_stats']) == want_keys


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
  assert jax.tree.structure(v_ours) == jax.tree.structure(v_theirs)


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
  module = BatchRenorm(rmax=rmax, dmax=dmax, epsilon=1e-3)
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
  module = BatchNorm(momentum=0.9, epsilon=1e-3, axis_name='devices')
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


def test_use_bias_use_scale_off_and_axis():
  x = _x(shape=(4, C, 3))
  variables = BatchNorm(use_bias=False, use_scale=False, axis=1).init(jax.random.key(0), x, use_running_average=False)
  assert 'params' not in variables
  assert variables['batch_stats']['mean'].shape == (C,)
  with pytest.raises(ValueError, match='axis=3'):
    BatchNorm(axis=3).init(jax.random.key(0), x, use_running_average=False)


def test_norm_state_fills_the_scalars_a_layer_does_not_store_and_rejects_other_statistics():
  state = norm_state({'mean': jnp.zeros(3), 'var': jnp.ones(3)})  # flax.linen.BatchNorm's batch_stats
  assert int(state.step) == 0 and float(state.decay_product) == 1.0
  with pytest.raises(ValueError, match='missing'):
    norm_state({'mean': jnp.zeros(3)})
  with pytest.raises(ValueError, match='missing'):
    norm_state({'mean': jnp.zeros(3), 'std': jnp.ones(3)})


# ----------------------------------------------------------------------------
# Precise BN: the layers record their batch moments; precise_batch_stats pools them.


def _apply_recording(module, variables, x, **kwargs):
  return module.apply(variables, x, use_running_average=False, mutable=['batch_stats', 'batch_moments'], **kwargs)


@pytest.mark.parametrize('kind', list(KINDS))
def test_training_call_records_the_moments_of_the_whole_batch(kind):
  module_type, _, options = KINDS[kind]
  module = module_type(**options)
  x = _x(shape=(8, 3, C)) + jnp.arange(8.0)[:, None, None]  # ghost groups with different means
  mask = jnp.arange(8) < 6
  variables = _random_state(module, x)
  y, updates = _apply_recording(module, variables, x, mask=mask)
  y_plain, plain = module.apply(variables, x, use_running_average=False, mask=mask, mutable=['batch_stats'])
  np.testing.assert_array_equal(y, y_plain)
  jax.tree.map(np.testing.assert_array_equal, updates['batch_stats'], plain['batch_stats'])
  recorded = updates['batch_moments']
  valid = np.asarray(x, np.float64)[:6].reshape(-1, C)  # ghost BN too: the whole batch, not each group
  np.testing.assert_allclose(recorded['mean'], valid.mean(0), rtol=1e-5)
  np.testing.assert_allclose(recorded['var'], valid.var(0), rtol=1e-5)
  np.testing.assert_array_equal(recorded['count'], np.full(C, 18))
  np.testing.assert_allclose(recorded['epsilon'], options.get('epsilon', 1e-3))
  assert recorded['mean'].dtype == recorded['var'].dtype == jnp.float32


def test_moments_are_recorded_only_in_training_calls_with_the_collection_mutable():
  x = _x()
  module = BatchNorm()
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  assert set(variables) == {'params', 'batch_stats'}
  _, updates = module.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
  assert set(updates) == {'batch_stats'}
  _, updates = module.apply(variables, x, use_running_average=False, mutable=True)  # not asked for by name
  assert set(updates) == {'params', 'batch_stats'}
  _, updates = module.apply(variables, x, use_running_average=True, mutable=['batch_stats', 'batch_moments'])
  assert 'batch_moments' not in updates or not updates['batch_moments']
  x16 = _x(shape=(8, C)).astype(jnp.bfloat16)
  _, updates = _apply_recording(module, variables, x16)
  np.testing.assert_allclose(updates['batch_moments']['var'], np.asarray(x16, np.float64).var(0), rtol=1e-5)
  assert updates['batch_moments']['var'].dtype == jnp.float32


def test_a_layer_called_twice_records_both_calls():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, a, b):
      norm = BatchNorm(use_running_average=False)
      return norm(a), norm(b)

  a, b = _x(1, (4, C)), _x(2, (12, C)) + 5.0
  variables = Twice().init(jax.random.key(0), a, b)
  _, updates = Twice().apply(variables, a, b, mutable=['batch_stats', 'batch_moments'])
  both = np.concatenate([np.asarray(a, np.float64), np.asarray(b, np.float64)])
  recorded = updates['batch_moments']['BatchNorm_0']
  np.testing.assert_allclose(recorded['mean'], both.mean(0), rtol=1e-5)
  np.testing.assert_allclose(recorded['var'], both.var(0), rtol=1e-5)
  np.testing.assert_array_equal(recorded['count'], np.full(C, 16))


def test_recorded_moments_under_axis_name_are_those_of_the_global_batch():
  module = BatchNorm(virtual_batch_size=3, axis_name='devices')
  x = _x(shape=(4, 6, C)) + jnp.arange(4.0)[:, None, None]  # 4 "devices" of 6 examples
  variables = module.init(jax.random.key(0), x[0], use_running_average=False)
  _, updates = jax.vmap(lambda xi: _apply_recording(module, variables, xi), axis_name='devices')(x)
  everything = np.asarray(x, np.float64).reshape(24, C)
  for device in range(4):
    np.testing.assert_allclose(updates['batch_moments']['mean'][device], everything.mean(0), rtol=1e-5)
    np.testing.assert_allclose(updates['batch_moments']['var'][device], everything.var(0), rtol=1e-5)


class _Block(nn.Module):
  """Dense -> norm -> relu; the norm's input is the Dense's output (named `dense`)."""

  width: int
  norm: Any

  @nn.compact
  def __call__(self, x, use_running_average):
    x = nn.Dense(self.width, name='dense')(x)
    return nn.relu(self.norm(name='norm')(x, use_running_average))


# The norm layer of each of the three blocks.
NETS = {
    'bn': [functools.partial(BatchNorm, momentum=0.9)] * 3,
    'ghost': [functools.partial(BatchNorm, virtual_batch_size=4)] * 3,
    'renorm': [functools.partial(BatchRenorm, rmax=1.5, dmax=0.5, epsilon=1e-2)] * 3,
    'mixed': [BatchNorm, functools.partial(BatchNorm, virtual_batch_size=2, epsilon=1e-4),
              functools.partial(BatchRenorm, rmax=2.0, dmax=1.0)],
}


class _Net(nn.Module):
  norms: tuple

  @nn.compact
  def __call__(self, x, use_running_average):
    for i, norm in enumerate(self.norms):
      x = _Block(6 - i, norm, name=f'block{i}')(x, use_running_average)
    return nn.Dense(2)(x)


def _net_and_data(kind, num_batches=5, batch_size=8):
  model = _Net(tuple(NETS[kind]))
  rng = np.random.default_rng(0)
  images = rng.normal(2.0, 1.5, (num_batches, batch_size, 4)).astype(np.float32)
  images += np.arange(num_batches, dtype=np.float32)[:, None, None]  # batch means differ
  variables = _random_state(model, jnp.asarray(images[0]))  # renorm statistics far off: r and d matter
  return model, variables, images


def _pooled_layer_inputs(model, variables, images):
  """Per block, the float64 mean and biased variance of its norm's input over every batch, by hand."""
  inputs = {}
  for batch in images:
    _, state = model.apply(
        variables, batch, False, mutable=['batch_stats', 'intermediates'],
        capture_intermediates=lambda module, _: module.name == 'dense',
    )
    for block, captured in state['intermediates'].items():
      inputs.setdefault(block, []).append(np.asarray(captured['dense']['__call__'][0], np.float64))
  return {block: (np.concatenate(x).mean(0), np.concatenate(x).var(0)) for block, x in inputs.items()}


def _assert_population(batch_stats, reference, model):
  for i, norm in enumerate(model.norms):
    stats, (mean, var) = batch_stats[f'block{i}']['norm'], reference[f'block{i}']
    np.testing.assert_allclose(stats['mean'], mean, rtol=1e-5, atol=1e-5)
    if 'std' in stats:
      epsilon = norm.keywords.get('epsilon', 1e-5) if isinstance(norm, functools.partial) else 1e-5
      np.testing.assert_allclose(stats['std'], np.sqrt(var + epsilon), rtol=1e-5)
      np.testing.assert_allclose(bnjax.moving_statistics(norm_state(stats), epsilon)[1], var, rtol=1e-4)
      np.testing.assert_array_equal(stats['renorm_std'], stats['std'])
      np.testing.assert_array_equal(stats['renorm_mean'], stats['mean'])
    else:
      np.testing.assert_allclose(stats['var'], var, rtol=1e-5)


@pytest.mark.parametrize('kind', list(NETS))
def test_precise_batch_stats_equal_the_statistics_of_each_layer_input(kind):
  model, variables, images = _net_and_data(kind)
  apply_fn = functools.partial(model.apply, use_running_average=False)
  batch_stats = precise_batch_stats(apply_fn, variables, images, num_examples=None)
  assert jax.tree.structure(batch_stats) == jax.tree.structure(variables['batch_stats'])
  _assert_population(batch_stats, _pooled_layer_inputs(model, variables, images), model)


def test_precise_batch_stats_of_one_layer_equal_numpy_population_statistics():
  model = _Net((BatchNorm,))
  images = np.random.default_rng(1).normal(3.0, 2.0, (6, 10, 4)).astype(np.float32)
  variables = model.init(jax.random.key(0), images[0], False)
  kernel, bias = (np.asarray(variables['params']['block0']['dense'][k], np.float64) for k in ('kernel', 'bias'))
  layer_input = images.reshape(60, 4).astype(np.float64) @ kernel + bias
  batch_stats = precise_batch_stats(functools.partial(model.apply, use_running_average=False), variables, images)
  np.testing.assert_allclose(batch_stats['block0']['norm']['mean'], layer_input.mean(0), rtol=1e-5)
  np.testing.assert_allclose(batch_stats['block0']['norm']['var'], layer_input.var(0), rtol=1e-5)
  # Inference with them normalizes with the population statistics.
  x = images[0]
  hidden = model.apply({**variables, 'batch_stats': batch_stats}, x, True, capture_intermediates=True,
                       mutable=['intermediates'])[1]['intermediates']['block0']['norm']['__call__'][0]
  want = (x.astype(np.float64) @ kernel + bias - layer_input.mean(0)) / np.sqrt(layer_input.var(0) + 1e-5)
  np.testing.assert_allclose(hidden, want, rtol=1e-4, atol=1e-5)


def test_precise_batch_stats_from_an_iterable_of_labelled_batches_and_num_examples():
  model, variables, images = _net_and_data('mixed')
  labels = np.zeros(images.shape[:2], np.int32)
  apply_fn = lambda v, batch, mutable: model.apply(v, batch[0], False, mutable=mutable)
  batches = [(images[k], labels[k]) for k in range(len(images))]
  # 20 examples in batches of 8: the first 3 batches.
  from_list = precise_batch_stats(apply_fn, variables, batches, num_examples=20)
  _assert_population(from_list, _pooled_layer_inputs(model, variables, images[:3]), model)
  stacked = precise_batch_stats(apply_fn, variables, (images, labels), num_examples=20)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stacked, from_list)


def test_precise_batch_stats_errors():
  model, variables, images = _net_and_data('bn')
  inference = functools.partial(model.apply, use_running_average=True)
  with pytest.raises(ValueError, match='no layer recorded'):
    precise_batch_stats(inference, variables, images)
  drops_mutable = lambda v, x, mutable: model.apply(v, x, False, mutable=['batch_stats'])
  with pytest.raises(ValueError, match='no layer recorded'):
    precise_batch_stats(drops_mutable, variables, images)
  with pytest.raises(ValueError, match='no batch_stats'):
    precise_batch_stats(functools.partial(model.apply, use_running_average=False), {'params': variables['params']}, images)


# ----------------------------------------------------------------------------
# A drop-in for flax.linen.BatchNorm: a ResNet written the way flax's examples/imagenet/models.py writes
# its blocks (BatchNorm through functools.partial with use_running_average, momentum, epsilon and dtype;
# scale_init=zeros on a block's last norm), run with flax's BatchNorm and with bnjax's.


class _ResNetBlock(nn.Module):
  filters: int
  conv: Any
  norm: Any
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return nn.relu(residual + y)


class _ResNet(nn.Module):
  batch_norm: Any  # flax.linen.BatchNorm or bnjax.linen.BatchNorm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(self.batch_norm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype)
    x = nn.relu(norm(name='bn_init')(conv(8, (3, 3), name='conv_init')(x)))
    x = _ResNetBlock(8, conv, norm)(x)
    x = _ResNetBlock(12, conv, norm, strides=(2, 2))(x)
    return nn.Dense(10, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))


def _resnet_data(steps=3, batch=8):
  rng = np.random.default_rng(0)
  images = rng.normal(0.5, 2.0, (steps + 1, batch, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 10, (steps + 1, batch))
  return images, labels


def _train(model, variables, images, labels, learning_rate=0.1):
  """Plain SGD steps; returns the per-step (logits, grads) and the final variables."""

  def loss_fn(params, batch_stats, x, y):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x, mutable=['batch_stats'])
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    return loss, (logits, updates['batch_stats'])

  @jax.jit
  def step(variables, x, y):
    grads, (logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(variables['params'], variables['batch_stats'], x, y)
    params = jax.tree.map(lambda p, g: p - learning_rate * g, variables['params'], grads)
    return {'params': params, 'batch_stats': batch_stats}, logits, grads

  trace = []
  for x, y in zip(images, labels):
    variables, logits, grads = step(variables, x, y)
    trace.append((logits, grads))
  return trace, variables


def _max_difference(a, b):
  return max(float(jnp.max(jnp.abs(jnp.asarray(u, jnp.float32) - jnp.asarray(v, jnp.float32))))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_resnet_with_bnjax_batchnorm_trains_as_with_flax_batchnorm():
  images, labels = _resnet_data()
  theirs, ours = _ResNet(nn.BatchNorm), _ResNet(BatchNorm)
  v_theirs = theirs.init(jax.random.key(0), images[0], train=False)
  v_ours = ours.init(jax.random.key(0), images[0], train=False)
  # The same variables, initializers (scale_init=zeros) included: a flax checkpoint is a bnjax one.
  assert jax.tree.structure(v_ours) == jax.tree.structure(v_theirs)
  assert _max_difference(v_ours, v_theirs) == 0.0
  trace_theirs, end_theirs = _train(theirs, v_theirs, images, labels)
  trace_ours, end_ours = _train(ours, v_theirs, images, labels)
  for (logits_t, grads_t), (logits_o, grads_o) in zip(trace_theirs, trace_ours):
    assert _max_difference(logits_o, logits_t) < 1e-4
    assert _max_difference(grads_o, grads_t) < 1e-4
  assert _max_difference(end_ours['batch_stats'], end_theirs['batch_stats']) < 1e-4
  assert _max_difference(end_ours['params'], end_theirs['params']) < 1e-4
  # Evaluation of flax's trained variables (its checkpoint) by bnjax's model.
  from flax import serialization
  restored = serialization.from_bytes(v_ours, serialization.to_bytes(end_theirs))
  test_images = images[-1]
  np.testing.assert_allclose(ours.apply(restored, test_images, train=False),
                             theirs.apply(end_theirs, test_images, train=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype,input_dtype', [(jnp.bfloat16, jnp.float32), (None, jnp.bfloat16)])
def test_dtype_follows_flax(dtype, input_dtype):
  x = _x(shape=(8, 4, C)).astype(input_dtype)
  for training in (True, False):
    results = []
    for module_type in (nn.BatchNorm, BatchNorm):
      module = module_type(dtype=dtype, use_running_average=not training)
      variables = module.init(jax.random.key(0), x)
      results.append(module.apply(variables, x, mutable=['batch_stats'])[0])
    assert results[0].dtype == results[1].dtype
    np.testing.assert_allclose(np.asarray(results[1], np.float32), np.asarray(results[0], np.float32),
                               rtol=2e-2, atol=2e-2)


def test_every_flax_argument_is_accepted_with_flax_defaults():
  import dataclasses
  theirs = {f.name: f.default for f in dataclasses.fields(nn.BatchNorm) if f.name not in ('parent', 'name')}
  ours = {f.name: f.default for f in dataclasses.fields(BatchNorm)}
  assert {name: ours[name] for name in theirs} == theirs
  x = _x(shape=(6, 3, C))
  options = dict(axis=(1, 2), use_bias=False, scale_init=nn.initializers.constant(2.0), param_dtype=jnp.float32,
                 use_fast_variance=False, force_float32_reductions=False, epsilon=1e-4, momentum=0.8)
  mask = (jnp.arange(6) < 4)[:, None, None]
  outputs = []
  for module in (nn.BatchNorm(**options), BatchNorm(**options)):
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    y, updates = module.apply(variables, x, use_running_average=False, mask=mask, mutable=['batch_stats'])
    outputs.append((y, updates, jax.tree.map(jnp.shape, variables)))
  assert outputs[0][2] == outputs[1][2]  # feature shape (3, C) for axis=(1, 2)
  assert _max_difference(outputs[1][0], outputs[0][0]) < 1e-5
  assert _max_difference(outputs[1][1], outputs[0][1]) < 1e-5


def test_batch_stats_survive_a_pmean_with_their_dtypes():
  # A schedule stores `step`; the user's pmean (flax's imagenet example syncs batch_stats so) makes it float32.
  module = BatchNorm(momentum=lambda step: jnp.where(step < 2, 0.0, 0.5))
  x = _x(shape=(2, 6, C))
  variables = module.init(jax.random.key(0), x[0], use_running_average=False)
  train = lambda v, xi: module.apply(v, xi, use_running_average=False, mutable=['batch_stats'])[1]['batch_stats']
  stats = jax.vmap(lambda xi: train(variables, xi))(x)
  stats = jax.vmap(lambda s: jax.lax.pmean(s, 'devices'), axis_name='devices')(stats)
  assert stats['step'].dtype == jnp.float32
  stats = jax.tree.map(lambda a: a[0], stats)
  again = train({**variables, 'batch_stats': stats}, x[1])
  assert again['step'].dtype == jnp.float32 and float(again['step']) == 2.0
  np.testing.assert_allclose(again['mean'], x[1].mean(0), rtol=1e-6)  # step 1 read back: momentum 0
