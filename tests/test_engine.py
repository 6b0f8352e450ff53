"""bnjax.lab.engine: steps, epochs and evaluation as pure functions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnjax.lab import engine, models


@pytest.fixture(scope='module')
def small():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((130, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 130), jnp.int32)
  model = models.get('mnist_mlp', norm='bn', dropout_placement='end', dropout_rate=0.3)
  optimizer = optax.adam(1e-3)
  return model, optimizer, images, labels


def test_epoch_batches_are_a_fresh_permutation_each_epoch(small):
  model, optimizer, images, _ = small
  state = engine.init_train_state(model, optimizer, 0, images[:1])
  b0 = np.asarray(engine.epoch_batches(state, 0, 130, 32))
  b1 = np.asarray(engine.epoch_batches(state, 1, 130, 32))
  assert b0.shape == (4, 32)  # 130 // 32 full batches: the partial one is dropped
  assert len(set(b0.ravel())) == 128 and b0.max() < 130
  assert not np.array_equal(b0, b1)
  np.testing.assert_array_equal(b0, engine.epoch_batches(state, 0, 130, 32))


def test_scan_of_steps_equals_a_loop_of_train_step(small):
  model, _, images, labels = small
  # SGD: Adam's first steps move by lr * sign(g), which turns rounding noise in
  # tiny gradients into different updates.
  optimizer = optax.sgd(0.1)
  state = engine.init_train_state(model, optimizer, 0, images[:1])
  batches = engine.epoch_batches(state, 0, 130, 32)
  scanned, totals = jax.jit(engine.make_train_steps(model, optimizer))(state, images, labels, batches)
  step = jax.jit(lambda state, x, y: engine.train_step(model, optimizer, state, x, y))
  looped = state
  loss_sum = 0.0
  for indices in batches:
    looped, metrics = step(looped, images[indices], labels[indices])
    loss_sum += float(metrics.loss_sum)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), scanned, looped)
  np.testing.assert_allclose(totals.loss_sum, loss_sum, rtol=1e-5)
  assert int(totals.count) == 128 and int(scanned.step) == 4


def test_training_is_deterministic_given_the_seed(small):
  model, optimizer, images, labels = small
  run = jax.jit(engine.make_train_steps(model, optimizer))
  results = []
  for _ in range(2):
    state = engine.init_train_state(model, optimizer, 7, images[:1])
    results.append(run(state, images, labels, engine.epoch_batches(state, 0, 130, 32)))
  jax.tree.map(np.testing.assert_array_equal, results[0], results[1])
  other = engine.init_train_state(model, optimizer, 8, images[:1])
  assert not np.array_equal(other.params['head']['kernel'], results[0][0].params['head']['kernel'])


def test_update_stats_false_keeps_the_initial_moving_statistics(small):
  model, optimizer, images, labels = small
  state = engine.init_train_state(model, optimizer, 0, images[:1])
  new_state, _ = engine.train_step(model, optimizer, state, images[:32], labels[:32], update_stats=False)
  jax.tree.map(np.testing.assert_array_equal, new_state.batch_stats, state.batch_stats)
  assert not np.allclose(new_state.params['head']['kernel'], state.params['head']['kernel'])
  updated, _ = engine.train_step(model, optimizer, state, images[:32], labels[:32])
  assert not np.allclose(updated.batch_stats['norm_0']['mean'], state.batch_stats['norm_0']['mean'])


@pytest.mark.parametrize('batch_size', [130, 50, 1000])
def test_evaluate_covers_every_example(small, batch_size):
  model, optimizer, images, labels = small
  state = engine.init_train_state(model, optimizer, 0, images[:1])
  totals = jax.jit(engine.make_evaluate(model, batch_size=batch_size))(state, images, labels)
  whole = engine.eval_step(model, state, images, labels)
  assert int(totals.count) == 130
  np.testing.assert_allclose(totals.loss_sum, whole.loss_sum, rtol=1e-5)
  np.testing.assert_allclose(totals.correct, whole.correct)


def test_batch_statistics_evaluation_uses_each_batch_and_no_dropout(small):
  model, optimizer, images, labels = small
  state = engine.init_train_state(model, optimizer, 0, images[:1])
  a = engine.eval_step(model, state, images[:50], labels[:50], eval_stats='batch')
  b = engine.eval_step(model, state, images[:50], labels[:50], eval_stats='batch')
  np.testing.assert_array_equal(a.loss_sum, b.loss_sum)  # deterministic: no dropout
  moving = engine.eval_step(model, state, images[:50], labels[:50])
  assert not np.isclose(float(a.loss_sum), float(moving.loss_sum))


def test_batch_statistics_evaluation_of_a_ghost_model_fills_whole_ghost_batches(small):
  _, optimizer, images, labels = small
  model = models.get('mnist_mlp', norm='ghost', virtual_batch_size=8)
  state = engine.init_train_state(model, optimizer, 0, images[:8])
  # Batch 100 becomes 96 (a multiple of 8); of 130 examples the 128 in whole ghost batches count.
  totals = jax.jit(engine.make_evaluate(model, batch_size=100, eval_stats='batch'))(state, images, labels)
  assert int(totals.count) == 128
  parts = [engine.eval_step(model, state, images[a:b], labels[a:b], eval_stats='batch')
           for a, b in ((0, 96), (96, 128))]
  np.testing.assert_allclose(totals.loss_sum, sum(float(m.loss_sum) for m in parts), rtol=1e-5)
  moving = jax.jit(engine.make_evaluate(model, batch_size=100))(state, images, labels)
  assert int(moving.count) == 130  # inference needs no batch: every example


def test_step_loop_choice():
  mlp = models.get('mnist_mlp', norm='bn')
  cnn = models.get('cifar_cnn', norm='bn')
  assert engine.step_loop_for(mlp, 'auto', backend='cpu') == 'scan'
  assert engine.step_loop_for(cnn, 'auto', backend='cpu') == 'python'
  assert engine.step_loop_for(cnn, 'auto', backend='gpu') == 'scan'
  assert engine.step_loop_for(cnn, 'scan', backend='cpu') == 'scan'
  with pytest.raises(ValueError, match='step_loop'):
    engine.step_loop_for(cnn, 'while')


def test_unrolled_steps_equal_scanned_steps(small):
  model, _, images, labels = small
  optimizer = optax.sgd(0.1)
  state = engine.init_train_state(model, optimizer, 0, images[:1])
  batches = engine.epoch_batches(state, 0, 130, 32)
  scanned = jax.jit(engine.make_train_steps(model, optimizer))(state, images, labels, batches)
  unrolled = state
  for i in range(batches.shape[0]):
    unrolled, _ = jax.jit(engine.make_train_steps(model, optimizer, unroll=True))(unrolled, images, labels, batches[i : i + 1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), scanned[0], unrolled)


def test_metrics_add_sums_every_field():
  a = engine.Metrics(jnp.asarray([1.0, 2.0]), jnp.asarray([1.0, 0.0]), jnp.asarray([4.0, 4.0]))
  total = a.add(engine.Metrics(jnp.asarray([0.5, 0.5]), jnp.asarray([2.0, 3.0]), jnp.asarray([4.0, 4.0])))
  assert isinstance(total, engine.Metrics)
  np.testing.assert_array_equal(np.asarray(total), [[1.5, 2.5], [3.0, 3.0], [8.0, 8.0]])
  np.testing.assert_array_equal(total.accuracy(), [3 / 8, 3 / 8])
