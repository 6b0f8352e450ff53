"""Run with 8 forced CPU devices: data-parallel training equals the 1-device run on the same global batch.

Prints one line per check ('ok <name> max_abs_diff=<d>') and exits non-zero on
the first mismatch. Used by tests/test_parallel.py in a subprocess (XLA_FLAGS
must be set before jax is imported).
"""

import sys

import jax
import numpy as np

from bnjax.lab import build, engine, parallel
from bnjax.lab.config import TrainConfig

DEVICES = 8
BATCH = 64
STEPS = 3
assert jax.device_count() == DEVICES, f'expected {DEVICES} devices, got {jax.device_count()}'
rng = np.random.default_rng(0)
images = rng.normal(0.5, 1.0, (512, 28, 28, 1)).astype(np.float32)
labels = rng.integers(0, 10, 512).astype(np.int32)


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check(name, got, want, tol):
  diff = max_diff(got, want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol, err_msg=name)
  print(f'ok {name} max_abs_diff={diff:.2e}')


def train(config, num_devices, cross_device_stats='sync'):
  """`(per-step losses, final state)` of STEPS steps on the same global batches."""
  model = build.model(config)
  optimizer = build.optimizer(config, STEPS)
  state = engine.init_train_state(model, optimizer, config.seed, images[:BATCH])
  batches = engine.epoch_batches(state, 0, images.shape[0], BATCH)[:STEPS]
  if num_devices == 1:
    with jax.default_device(jax.devices()[0]):
      step = jax.jit(engine.make_train_steps(model, optimizer))
      data = (images, labels)
  else:
    mesh = parallel.make_mesh(num_devices)
    step = jax.jit(engine.make_data_parallel_train_steps(
        model, optimizer, mesh, batch_size=BATCH, cross_device_stats=cross_device_stats))
    state, data = parallel.replicate((state, (images, labels)), mesh)
  losses = []
  for i in range(STEPS):
    state, metrics = step(state, *data, batches[i : i + 1])
    losses.append(float(metrics.mean_loss()))
    assert float(metrics.count) == BATCH, metrics
  return np.array(losses), jax.device_get(state)


TOL = 2e-5
# SGD, not Adam: the biases of the linear layers before BN have no effect on
# the loss, so their gradient is rounding noise, which Adam scales up to
# learning-rate-sized steps that differ between any two summation orders.
bn = TrainConfig(model='mnist_mlp', norm='bn', batch_size=BATCH, learning_rate=0.1, optimizer='sgd')
want_losses, want_state = train(bn, 1)
losses, state = train(bn, DEVICES, 'sync')
print('losses', losses.tolist())
check('sync losses', losses, want_losses, TOL)
check('sync params', state.params, want_state.params, TOL)
check('sync moving statistics', state.batch_stats, want_state.batch_stats, TOL)
check('sync optimizer state', state.opt_state, want_state.opt_state, TOL)
assert max_diff(losses, train(bn, DEVICES, 'local')[0]) > 1e-4, 'local mode should differ from sync'
print('ok local differs from sync')

ghost = TrainConfig(model='mnist_mlp', norm='ghost', virtual_batch_size=BATCH // DEVICES, batch_size=BATCH,
                    learning_rate=0.1, optimizer='sgd')
want_losses, want_state = train(ghost, 1)
losses, state = train(bn, DEVICES, 'local')
check('local losses = 1-device ghost', losses, want_losses, TOL)
check('local params = 1-device ghost', state.params, want_state.params, TOL)
check('local moving statistics = 1-device ghost', state.batch_stats, want_state.batch_stats, TOL)

# A ghost model keeps its groups: sync and local are the same program.
losses, state = train(ghost, DEVICES, 'sync')
check('ghost on 8 devices = 1-device ghost', losses, want_losses, TOL)

renorm = TrainConfig(model='mnist_mlp', norm='renorm', batch_size=BATCH, learning_rate=0.1, optimizer='sgd')
want_losses, want_state = train(renorm, 1)
losses, state = train(renorm, DEVICES, 'sync')
check('renorm sync losses', losses, want_losses, TOL)
check('renorm sync moving statistics', state.batch_stats, want_state.batch_stats, TOL)

# Fewer devices than exist, and the divisibility error.
losses, _ = train(bn, 4, 'sync')
check('sync on 4 of 8 devices', losses, train(bn, 1)[0], TOL)
try:
  engine.make_data_parallel_train_steps(build.model(bn), build.optimizer(bn, 1), parallel.make_mesh(DEVICES), batch_size=60)
except ValueError as error:
  assert '--batch_size=60' in str(error) and '--num_devices=8' in str(error), error
  print('ok indivisible batch rejected:', error)
else:
  sys.exit('a batch of 60 on 8 devices was accepted')

# Evaluation split over the devices equals one device's; 509 examples leave 5 outside the 8 shares.
model = build.model(bn)
trained = train(bn, 1)[1]
mesh = parallel.make_mesh(DEVICES)
for stats in ('moving', 'batch'):
  want = jax.jit(engine.make_evaluate(model, batch_size=100, eval_stats=stats))(trained, images[:509], labels[:509])
  got = jax.jit(engine.make_data_parallel_evaluate(model, mesh, batch_size=100, eval_stats=stats))(
      *parallel.replicate((trained, images[:509], labels[:509]), mesh))
  assert float(got.count) == 509 and float(got.correct) == float(want.correct), (stats, got, want)
  check(f'evaluation on 8 devices = 1 device ({stats} statistics)', got, want, TOL)

print('all parallel checks passed')
