"""Run with 8 forced CPU devices: bnjax statistics under shard_map equal those of the whole batch,
and `normalize` (used without `mapped`) gives the values and gradients of one device.

Prints one line per check and exits non-zero on the first mismatch. Used by
tests/test_norm_sharded.py in a subprocess (XLA_FLAGS must be set before jax
is imported).
"""

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


def user_norm(x, params, axis_name=None, **normalize_options):
  """A norm function built from bnjax's parts, as a user would: global statistics, then `normalize`.

  It does not tell `normalize` that it runs under a mapped axis (no `mapped`).
  """
  reduce_axes = tuple(range(x.ndim - 1))
  moments = bnjax.batch_moments(x, reduce_axes, axis_name=axis_name)
  scale, bias = (params[k].reshape((1,) * (x.ndim - 1) + (-1,)) for k in ('scale', 'bias'))
  return normalize(x, moments, scale, bias, None, reduce_axes=reduce_axes, epsilon=1e-3, **normalize_options)


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

  # A new norm function built on `normalize` needs no `mapped=True` under shard_map:
  # normalize sees the mapped axis itself. `mapped` is still accepted.
  want = output_and_gradients(user_norm, x, params, dy)
  got = sharded_output_and_gradients(lambda x, p: user_norm(x, p, 'batch'), x, dy)
  check(f'normalize without mapped under shard_map {shape}', got, want, tol=1e-4)
  for mapped in (True, False):
    got = sharded_output_and_gradients(lambda x, p: user_norm(x, p, 'batch', mapped=mapped), x, dy)
    check(f'normalize mapped={mapped} under shard_map {shape}', got, want, tol=1e-4)

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

print('all sharded checks passed')
sys.exit(0)
