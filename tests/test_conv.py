"""bnjax.lab.conv against flax.linen: Conv's values and gradients, max_pool's values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.lab import conv as conv_lib

TOL = dict(rtol=2e-5, atol=2e-5)


def _inputs(batch, channels, size=6, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, channels))


def _pair(features, x, **options):
  """(reference flax Conv, bnjax Conv, variables): the same variables serve both."""
  reference = nn.Conv(features, (3, 3), padding='SAME', **options)
  ours = conv_lib.Conv(features, (3, 3), padding='SAME', **options)
  variables = ours.init(jax.random.key(1), x)
  # Non-zero bias, so that its gradient and its place in the output are tested too.
  variables = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(2), v.shape), variables)
  return reference, ours, variables


def _loss(module, variables, x, target):
  return jnp.sum(jnp.sin(module.apply(variables, x)) * target)


@pytest.mark.parametrize('channels', [1, 3, 32])
@pytest.mark.parametrize('batch', [1, 4, 20])  # 20: kernel-gradient slices of 8, 8 and 4
def test_conv_values_and_gradients_equal_flax(channels, batch):
  x = _inputs(batch, channels)
  reference, ours, variables = _pair(16, x)
  target = jax.random.normal(jax.random.key(3), (batch, 6, 6, 16))
  np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), **TOL)
  grad = jax.jit(jax.grad(_loss, argnums=(1, 2)), static_argnums=0)
  (ours_params, ours_x), (ref_params, ref_x) = grad(ours, variables, x, target), grad(reference, variables, x, target)
  np.testing.assert_allclose(ours_x, ref_x, **TOL)
  for name in ('kernel', 'bias'):
    np.testing.assert_allclose(ours_params['params'][name], ref_params['params'][name], **TOL)


def test_conv_parameters_and_init_equal_flax():
  x = _inputs(2, 3)
  options = dict(kernel_init=nn.initializers.glorot_uniform(), bias_init=nn.initializers.normal(0.5))
  reference = nn.Conv(32, (3, 3), padding='SAME', **options).init(jax.random.key(5), x)
  ours = conv_lib.Conv(32, (3, 3), padding='SAME', **options).init(jax.random.key(5), x)
  assert jax.tree.map(jnp.shape, ours) == {'params': {'kernel': (3, 3, 3, 32), 'bias': (32,)}}
  jax.tree.map(np.testing.assert_array_equal, ours, reference)


@pytest.mark.parametrize('channels', [3, 16])
def test_conv_under_vmap_equals_flax(channels):
  xs = jax.random.normal(jax.random.key(0), (3, 2, 5, 5, channels))  # 3 mapped batches of 2
  reference, ours, variables = _pair(8, xs[0])

  def value_and_grad(module):
    def one(x):
      return jax.value_and_grad(lambda x: jnp.sum(module.apply(variables, x) ** 2))(x)
    return jax.jit(jax.vmap(one))(xs)

  for got, want in zip(value_and_grad(ours), value_and_grad(reference)):
    np.testing.assert_allclose(got, want, **TOL)


def test_conv_extra_batch_dimensions_and_no_batch_dimension():
  reference, ours, variables = _pair(4, _inputs(1, 3))
  for x in (jax.random.normal(jax.random.key(0), (2, 3, 5, 5, 3)), jax.random.normal(jax.random.key(0), (5, 5, 3))):
    np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), **TOL)


@pytest.mark.parametrize('channels', [3, 16])
def test_conv_second_order_equals_flax(channels):
  x = _inputs(2, channels, size=4)
  reference, ours, variables = _pair(4, x)
  target = jax.random.normal(jax.random.key(3), (2, 4, 4, 4))
  direction = jax.tree.map(lambda v: jax.random.normal(jax.random.key(4), v.shape), variables)

  def hvp(module):  # Hessian-vector product of the loss in the parameters
    grad = lambda v: jax.grad(_loss, argnums=1)(module, v, x, target)
    return jax.jvp(grad, (variables,), (direction,))[1]

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), hvp(ours), hvp(reference))


def _has_xla_convolution(fn, *args):
  return 'stablehlo.convolution' in jax.jit(fn).lower(*args).as_text()


def _convolutions_in_gradient(module, variables, x):
  loss = lambda variables: jnp.sum(module.apply(variables, x) ** 2)
  return jax.jit(jax.grad(loss)).lower(variables).as_text().count('stablehlo.convolution')


def test_conv_kernel_gradient_is_summed_over_batch_slices_on_cpu_only(monkeypatch):
  if jax.default_backend() != 'cpu':
    pytest.skip('the fast path is for the CPU backend')
  x = _inputs(2 * conv_lib.KERNEL_GRAD_CHUNK + 1, 16)
  _, ours, variables = _pair(4, x)
  assert _convolutions_in_gradient(ours, variables, x) == 1 + 3  # the value; the kernel gradient of 3 slices
  monkeypatch.setattr(conv_lib, '_on_cpu', lambda: False)  # as traced for a GPU or TPU: flax's own
  assert _convolutions_in_gradient(ours, variables, x) == 1 + 1


@pytest.mark.parametrize('options', [dict(strides=2), dict(padding='VALID'), dict(kernel_dilation=2)])
def test_other_convolutions_are_flax_own(options):
  x = _inputs(2, 3, size=8)
  padding = options.pop('padding', 'SAME')
  reference = nn.Conv(4, (3, 3), padding=padding, **options)
  ours = conv_lib.Conv(4, (3, 3), padding=padding, **options)
  variables = ours.init(jax.random.key(1), x)
  np.testing.assert_array_equal(ours.apply(variables, x), reference.apply(variables, x))


@pytest.mark.parametrize('size', [2, 3])
@pytest.mark.parametrize('shape', [(2, 8, 8, 5), (1, 9, 7, 3)])
def test_max_pool_equals_flax_where_no_ties(size, shape):
  x = jax.random.normal(jax.random.key(0), shape)  # continuous values: no ties
  reference = lambda x: nn.max_pool(x, (size, size), strides=(size, size))
  ours = lambda x: conv_lib.max_pool(x, size)
  np.testing.assert_array_equal(ours(x), reference(x))
  g = jax.random.normal(jax.random.key(1), reference(x).shape)
  grads = [jax.jit(jax.grad(lambda x, f=f: jnp.sum(f(x) * g)))(x) for f in (ours, reference)]
  np.testing.assert_array_equal(*grads)


def test_max_pool_ties_share_the_gradient():
  x = jnp.zeros((1, 2, 2, 1)).at[0, 1, 1, 0].set(-1.0)  # three tied maxima (0) in one window
  grad = jax.grad(lambda x: jnp.sum(conv_lib.max_pool(x, 2) * 3.0))(x)
  np.testing.assert_allclose(jnp.sum(grad), 3.0)
  assert grad[0, 1, 1, 0] == 0.0
  assert jnp.all(grad >= 0)
