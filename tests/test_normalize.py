"""bnjax.normalize: the closed-form gradient equals autodiff through the batch statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import moments
from bnjax.normalize import normalize

EPS = 1e-3


def _autodiff_reference(x, multiplier, offset, mask, reduce_axes):
  m = moments.batch_moments(x, reduce_axes, mask)
  return (x - m.mean) * jax.lax.rsqrt(m.var + EPS) * multiplier + offset


def _closed_form(x, multiplier, offset, mask, reduce_axes):
  m = moments.batch_moments(x, reduce_axes, mask)
  return normalize(x, m, multiplier, offset, mask, reduce_axes=reduce_axes, epsilon=EPS)


@pytest.mark.parametrize(
    'shape, reduce_axes, param_shape, mask_shape',
    [
        ((32, 6), (0,), (1, 6), None),
        ((8, 3, 3, 6), (0, 1, 2), (1, 1, 1, 6), (8, 1, 1, 1)),
        ((4, 8, 6), (1,), (4, 1, 6), (4, 8, 1)),  # ghost groups with per-group multipliers (renorm's r)
        ((4, 8, 6), (1,), (1, 1, 6), None),
    ],
)
def test_closed_form_gradient_equals_autodiff(shape, reduce_axes, param_shape, mask_shape):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(1.0, 2.0, shape), jnp.float32)
  dy = jnp.asarray(rng.normal(size=shape), jnp.float32)
  multiplier = jnp.asarray(rng.uniform(0.5, 2.0, param_shape), jnp.float32)
  offset = jnp.asarray(rng.normal(size=param_shape), jnp.float32)
  mask = None if mask_shape is None else jnp.asarray(rng.random(mask_shape) > 0.3)

  def loss(fn):
    return lambda x, a, b: jnp.sum(fn(x, a, b, mask, reduce_axes) * dy)

  np.testing.assert_allclose(loss(_closed_form)(x, multiplier, offset), loss(_autodiff_reference)(x, multiplier, offset), rtol=1e-5)
  got = jax.grad(loss(_closed_form), (0, 1, 2))(x, multiplier, offset)
  want = jax.grad(loss(_autodiff_reference), (0, 1, 2))(x, multiplier, offset)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('masked', [False, True])
def test_second_order_gradients_equal_autodiff(masked):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(1.0, 2.0, (16, 4)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  a, b = jnp.asarray(rng.uniform(0.5, 2.0, (1, 4)), jnp.float32), jnp.zeros((1, 4))
  mask = jnp.asarray(np.arange(16)[:, None] % 3 != 0) if masked else None

  def hessian_vector_product(fn):
    loss = lambda x: jnp.sum(fn(x, a, b, mask, (0,)) ** 3)
    return jax.jvp(jax.grad(loss), (x,), (v,))[1]

  np.testing.assert_allclose(
      hessian_vector_product(_closed_form), hessian_vector_product(_autodiff_reference), rtol=1e-3, atol=1e-3
  )


def _user_norm(x, multiplier, offset, axis_name=None):
  """A norm function built on `normalize`, as a user writes one: statistics over `axis_name` too."""
  m = moments.batch_moments(x, (0,), axis_name=axis_name)
  return normalize(x, m, multiplier, offset, None, reduce_axes=(0,), epsilon=EPS)


def test_gradients_under_a_named_vmap():
  # Statistics over the named axis: the closed form would sum over each instance only.
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(1.0, 2.0, (32, 6)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  a, b = jnp.asarray(rng.uniform(0.5, 2.0, (1, 6)), jnp.float32), jnp.asarray(rng.normal(size=(1, 6)), jnp.float32)
  loss = lambda x, a, b, dy, axis_name=None: jnp.sum(_user_norm(x, a, b, axis_name) * dy)
  want = jax.grad(loss, (0, 1, 2))(x, a, b, dy)
  dx, da, db = jax.vmap(
      lambda x, dy: jax.grad(loss, (0, 1, 2))(x, a, b, dy, 'i'), axis_name='i'
  )(x.reshape(4, 8, 6), dy.reshape(4, 8, 6))
  np.testing.assert_allclose(dx.reshape(32, 6), want[0], rtol=1e-4, atol=1e-4)
  # Each instance holds the gradient of its own loss; together, that of the whole batch.
  np.testing.assert_allclose(da.sum(0), want[1], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(db.sum(0), want[2], rtol=1e-4, atol=1e-4)


def test_closed_form_runs_outside_named_axes_only():
  x = jnp.asarray(np.random.default_rng(6).normal(size=(4, 8, 3)), jnp.float32)
  a, b = jnp.ones((1, 3)), jnp.zeros((1, 3))
  uses_closed_form = lambda f: 'custom_vjp_call' in str(jax.make_jaxpr(f)(x))
  assert uses_closed_form(lambda x: _user_norm(x[0], a, b))
  assert uses_closed_form(jax.vmap(lambda x: _user_norm(x, a, b)))  # independent instances
  assert not uses_closed_form(jax.vmap(lambda x: _user_norm(x, a, b), axis_name='i'))
  assert not uses_closed_form(jax.vmap(lambda x: _user_norm(x, a, b, 'i'), axis_name='i'))
