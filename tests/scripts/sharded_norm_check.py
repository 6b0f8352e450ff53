"""Run with 8 forced CPU devices: bnjax statistics under shard_map equal those of the whole batch,
and `normalize`, told nothing of the mesh, gives the values and gradients of one device.

Prints one line per check and exits non-zero on the first mismatch. Used by
tests/test_norm_sharded.py in a subprocess (XLA_FLAGS must be set before jax
is imported).
"""

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

import bnjax
from bnjax.normalize import normalize

DEVICES = 8
assert jax.device_count() == DEVICES, f'expected {DEVICES} devices, got {jax.device_count()}'
mesh = Mesh(np.array(jax.devices()), ('batch',))
rng = np.random.default_rng(0)


def sharded(fn, n_args):
  return jax.jit(
      jax.shard_map(fn, mesh=mesh, in_specs=(P('batch'),) * n_args, out_specs=(P('batch'), P()))
  )


def user_norm(x, params, axis_name=None):
  """A norm function built from bnjax's parts, as a user would: global statistics, then `normalize`.

  It does not tell `normalize` that it runs under a mapped axis: `normalize` sees it itself.
  """
  reduce_axes = tuple(range(x.ndim - 1))
  moments = bnjax.batch_moments(x, reduce_axes, axis_name=axis_name)
  scale, bias = (params[k].reshape((1,) * (x.ndim - 1) + (-1,)) for k in ('scale', 'bias'))
  return normalize(x, moments, scale, bias, None, reduce_axes=reduce_axes, epsilon=1e-3)


def output_and_gradients(norm_fn, x, params, dy):
  """`(y, (dx, dparams))` of the loss `sum(norm_fn(x, params) * dy)`."""
  loss = lambda x, p: (jnp.sum(norm_fn(x, p) * dy), norm_fn(x, p))
  (_, y), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params)
  return y, grads


def sharded_output_and_gradients(norm_fn, x, dy):
  """`output_and_gradients` on each device's shard; params replicated (their gradients summed by shard_map)."""
  return jax.jit(jax.shard_map(
      lambda x, dy: output_and_gradients(norm_fn, x, params, dy),
      mesh=mesh, in_specs=(P('batch'), P('batch')), out_specs=(P('batch'), (P('batch'), P())),
  ))(x, dy)


def check(name, got, want, tol=1e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol, err_msg=name)
  print('ok', name)


for shape in [(64, 12), (16, 4, 4, 12)]:
  x = (rng.normal(1.5, 2.0, shape)).astype(np.float32)
  dy = rng.normal(0, 1, shape).astype(np.float32)
  params = {'scale': np.linspace(0.5, 1.5, 12, dtype=np.float32), 'bias': np.linspace(-1, 1, 12, dtype=np.float32)}
  _, state = bnjax.batch_norm_init(12)
  _, rstate = bnjax.batch_renorm_init(12)
  rstate = rstate._replace(renorm_mean=jnp.full(12, 0.5), renorm_std=jnp.full(12, 1.5))

  # Plain BN: output, new state, and gradients.
  y_ref, s_ref = bnjax.batch_norm(x, params, state, training=True, momentum=0.5)
  y, s = sharded(lambda x: bnjax.batch_norm(x, params, state, training=True, momentum=0.5, axis_name='batch'), 1)(x)
  check(f'batch_norm {shape}', (y, s), (y_ref, s_ref))
  grad_ref = jax.grad(lambda x, p: jnp.sum(bnjax.batch_norm(x, p, state, training=True)[0] * dy), (0, 1))(x, params)

  def local_loss(x, p, dy):
    return jnp.sum(bnjax.batch_norm(x, p, state, training=True, axis_name='batch')[0] * dy)

  def sharded_grad(x, dy):
    # params are replicated (unvarying over 'batch'): shard_map's autodiff
    # already sums their gradient over the devices.
    return jax.grad(local_loss, (0, 1))(x, params, dy)

  gx, gp = jax.jit(jax.shard_map(sharded_grad, mesh=mesh, in_specs=(P('batch'), P('batch')), out_specs=(P('batch'), P())))(x, dy)
  check(f'batch_norm gradients {shape}', (gx, gp), grad_ref, tol=1e-4)

  # Unequal masks: devices hold 0..all valid examples; still the statistics of the valid ones.
  per_device = shape[0] // DEVICES
  mask = np.concatenate([np.arange(per_device) < (d % (per_device + 1)) for d in range(DEVICES)])
  assert mask.any() and not mask.all()
  y_ref, s_ref = bnjax.batch_norm(x, params, state, training=True, momentum=0.0, mask=mask)
  _, s_valid = bnjax.batch_norm(x[mask], params, state, training=True, momentum=0.0)
  check(f'masked statistics = statistics of the valid examples {shape}', s_ref, s_valid)
  y, s = sharded(
      lambda x, m: bnjax.batch_norm(x, params, state, training=True, momentum=0.0, mask=m, axis_name='batch'), 2
  )(x, mask)
  check(f'batch_norm unequal masks {shape}', (y, s), (y_ref, s_ref))

  # Renorm.
  y_ref, s_ref = bnjax.batch_renorm(x, params, rstate, training=True, rmax=1.5, dmax=0.5, mask=mask)
  y, s = sharded(
      lambda x, m: bnjax.batch_renorm(x, params, rstate, training=True, rmax=1.5, dmax=0.5, mask=m, axis_name='batch'), 2
  )(x, mask)
  check(f'batch_renorm unequal masks {shape}', (y, s), (y_ref, s_ref))

  # Ghost BN with the per-device batch as the virtual batch: groups stay local,
  # the moving statistics pool every device's groups.
  y_ref, s_ref = bnjax.batch_norm(x, params, state, training=True, virtual_batch_size=per_device)
  y, s = sharded(
      lambda x: bnjax.batch_norm(x, params, state, training=True, virtual_batch_size=per_device, axis_name='batch'), 1
  )(x)
  check(f'ghost batch norm per device {shape}', (y, s), (y_ref, s_ref))
  ghost_grad_ref = jax.grad(
      lambda x, p: jnp.sum(bnjax.batch_norm(x, p, state, training=True, virtual_batch_size=per_device)[0] * dy), (0, 1)
  )(x, params)

  def ghost_local_loss(x, p, dy):
    y, _ = bnjax.batch_norm(x, p, state, training=True, virtual_batch_size=per_device, axis_name='batch')
    return jnp.sum(y * dy)

  ghost_grads = jax.jit(jax.shard_map(
      lambda x, dy: jax.grad(ghost_local_loss, (0, 1))(x, params, dy),
      mesh=mesh, in_specs=(P('batch'), P('batch')), out_specs=(P('batch'), P()),
  ))(x, dy)
  check(f'ghost batch norm gradients per device {shape}', ghost_grads, ghost_grad_ref, tol=1e-4)

  # A new norm function built on `normalize` under shard_map: normalize sees the mapped axis itself.
  want = output_and_gradients(user_norm, x, params, dy)
  got = sharded_output_and_gradients(lambda x, p: user_norm(x, p, 'batch'), x, dy)
  check(f'normalize under shard_map {shape}', got, want, tol=1e-4)

  # Per-device batch norm (no axis_name) under shard_map is ghost BN over the device batches.
  want = output_and_gradients(
      lambda x, p: bnjax.batch_norm(x, p, state, training=True, virtual_batch_size=per_device)[0], x, params, dy
  )
  got = sharded_output_and_gradients(lambda x, p: bnjax.batch_norm(x, p, state, training=True)[0], x, dy)
  check(f'per-device batch_norm without axis_name under shard_map {shape}', got, want, tol=1e-4)

  # vmap with an axis name is the same mechanism.
  xs = x.reshape((DEVICES, per_device) + shape[1:])
  y, s = jax.vmap(
      lambda x: bnjax.batch_norm(x, params, state, training=True, momentum=0.5, axis_name='i'),
      axis_name='i', out_axes=(0, None),
  )(xs)
  y_ref, s_ref = bnjax.batch_norm(x, params, state, training=True, momentum=0.5)
  check(f'vmap axis_name {shape}', (y.reshape(shape), s), (y_ref, s_ref))


# Data with a large mean (1e4 + N(0, 1) on each device, another offset per device): the statistics
# combined across devices keep the variance, where a one-pass sum of squares cancels to 0 or less.
shape = (64, 12)
offsets = np.repeat(np.linspace(0.0, 0.7, DEVICES), shape[0] // DEVICES)[:, None]
x = (1e4 + offsets + rng.normal(0, 1, shape)).astype(np.float32)
dy = rng.normal(0, 1, shape).astype(np.float32)
x64 = x.astype(np.float64)
_, state = bnjax.batch_norm_init(12)
y, s = sharded(lambda x: bnjax.batch_norm(x, params, state, training=True, momentum=0.0, axis_name='batch'), 1)(x)
check('large mean: sharded mean = float64 mean', s.mean, x64.mean(0), tol=1e-4)
check('large mean: sharded variance = float64 variance', s.var, x64.var(0), tol=1e-4)
y_ref, s_ref = bnjax.batch_norm(x, params, state, training=True, momentum=0.0)
check('large mean: sharded = one device (statistics)', s, s_ref, tol=1e-4)
print('large mean: max relative variance error against float64: sharded %.1e, one device %.1e'
      % tuple(np.max(np.abs(v / x64.var(0) - 1)) for v in (s.var, s_ref.var)))
# y = (x - mean) / std: a float32 mean near 1e4 is only known to half an ulp (4.9e-4), on one
# device as on eight, so y is compared with float64 at that resolution.
y64 = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-3) * params['scale'] + params['bias']
error, error_ref = np.max(np.abs(y - y64)), np.max(np.abs(y_ref - y64))
print(f'large mean: max |y - y_float64|: sharded {error:.2e}, one device {error_ref:.2e}')
check('large mean: sharded y = float64 y at float32 resolution', y, y64, tol=2e-3)
one_pass = np.mean(x * x, 0) - np.mean(x, 0) ** 2
assert np.max(np.abs(one_pass - x64.var(0))) > 0.1, 'the one-pass variance should cancel in float32'
grad_ref = jax.grad(lambda x, p: jnp.sum(bnjax.batch_norm(x, p, state, training=True)[0] * dy), (0, 1))(x, params)
got = jax.jit(jax.shard_map(
    lambda x, dy: jax.grad(lambda x, p: jnp.sum(bnjax.batch_norm(x, p, state, training=True, axis_name='batch')[0] * dy), (0, 1))(x, params),
    mesh=mesh, in_specs=(P('batch'), P('batch')), out_specs=(P('batch'), P()),
))(x, dy)
# The float64 gradients: dx = scale / sigma * (dy - mean(dy) - x_hat * mean(dy * x_hat)).
sigma64 = np.sqrt(x64.var(0) + 1e-3)
x_hat64 = (x64 - x64.mean(0)) / sigma64
dy64 = dy.astype(np.float64)
dx64 = params['scale'] / sigma64 * (dy64 - dy64.mean(0) - x_hat64 * (dy64 * x_hat64).mean(0))
grad64 = (dx64, {'bias': dy64.sum(0), 'scale': (dy64 * x_hat64).sum(0)})
errors = [max(np.max(np.abs(np.asarray(g) - w)) for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(grad64)))
          for grads in (got, grad_ref)]
print(f'large mean: max gradient error against float64: sharded {errors[0]:.2e}, one device {errors[1]:.2e}')
check('large mean: gradients = float64 gradients at float32 resolution', got, grad64, tol=2e-2)
mask = np.concatenate([np.arange(shape[0] // DEVICES) < d for d in range(DEVICES)])
_, s = sharded(lambda x, m: bnjax.batch_norm(x, params, state, training=True, momentum=0.0, mask=m, axis_name='batch'), 2)(x, mask)
check('large mean, unequal masks: variance of the valid examples', (s.mean, s.var), (x64[mask].mean(0), x64[mask].var(0)), tol=1e-4)

# Low-precision input: float32 statistics of the global batch.
xb = jnp.asarray(rng.normal(3.0, 2.0, shape), jnp.bfloat16)
y, s = sharded(lambda x: bnjax.batch_norm(x, params, state, training=True, momentum=0.0, axis_name='batch'), 1)(xb)
y_ref, s_ref = bnjax.batch_norm(xb, params, state, training=True, momentum=0.0)
assert y.dtype == jnp.bfloat16
check('bfloat16 input: float32 statistics of the global batch', (y.astype(jnp.float32), s), (y_ref.astype(jnp.float32), s_ref), tol=1e-2)
check('bfloat16 input: statistics', s, s_ref, tol=1e-5)

# axis_index_groups (pmap): each group's statistics are those of its devices' examples.
groups = [[0, 2, 4, 6], [1, 3, 5, 7]]
xs = x.reshape((DEVICES, -1) + shape[1:]) - 1e4
pm = jax.pmap(
    lambda x: bnjax.batch_norm(x, params, state, training=True, momentum=0.0, axis_name='i', axis_index_groups=groups)[1],
    axis_name='i',
)(xs)
for group in groups:
  whole = xs[np.asarray(group)].reshape((-1,) + shape[1:]).astype(np.float64)
  for device in group:
    check(f'axis_index_groups: device {device} has its group\'s statistics', (pm.mean[device], pm.var[device]), (whole.mean(0), whole.var(0)))


def collectives(fn, *args):
  """The number of cross-device collectives in `fn`'s compiled HLO."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  return len(re.findall(r'\b(?:all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(', text))


# One collective per synchronized BN layer forward, and one backward: two layers, 2 + 2.
def two_layers(x, p):
  h, _ = bnjax.batch_norm(x, p, state, training=True, axis_name='batch')
  r, _ = bnjax.batch_renorm(jnp.tanh(h), p, rstate, training=True, axis_name='batch')
  return r


for check_vma in (True, False):
  forward = jax.shard_map(lambda x: two_layers(x, params), mesh=mesh, in_specs=P('batch'), out_specs=P('batch'), check_vma=check_vma)
  backward = jax.shard_map(
      lambda x, dy: jax.grad(lambda x, p: jnp.sum(two_layers(x, p) * dy), (0, 1))(x, params),
      mesh=mesh, in_specs=(P('batch'), P('batch')), out_specs=(P('batch'), P()), check_vma=check_vma,
  )
  counts = collectives(forward, x), collectives(backward, x, dy)
  print(f'collectives of two BN layers (check_vma={check_vma}): forward {counts[0]}, forward + backward {counts[1]}')
  assert counts == (2, 4), counts
  print('ok collective count', check_vma)

print('all sharded checks passed')
sys.exit(0)
