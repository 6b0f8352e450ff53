"""bnjax.precise: pooled batch moments equal numpy's statistics of the concatenated batches."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import precise
from bnjax.moments import Moments, batch_moments
from conftest import REPO

C = 3


def _batches(sizes, seed=0, loc=0.0):
  """Batches `[n, 4, C]` of unequal sizes whose means differ (the between-batch term matters)."""
  rng = np.random.default_rng(seed)
  return [(loc + rng.normal(k, 1.0 + k, (n, 4, C))).astype(np.float32) for k, n in enumerate(sizes)]


def _numpy_moments(xs):
  """float64 mean and biased variance over every axis but the last, of the concatenated batches."""
  x = np.concatenate([np.asarray(b, np.float64).reshape(-1, C) for b in xs])
  return x.mean(0), x.var(0), len(x)


def _moments(x, mask=None):
  m = batch_moments(jnp.asarray(x), (0, 1), mask)
  return Moments(*(a.reshape(C) for a in m))


def _template():
  return Moments(*(jnp.zeros(C) for _ in Moments._fields))


def _assert_pooled(pooled, xs, rtol=1e-5):
  mean, var, count = _numpy_moments(xs)
  np.testing.assert_allclose(pooled.mean, mean, rtol=rtol, atol=1e-5)
  np.testing.assert_allclose(pooled.var, var, rtol=rtol)
  np.testing.assert_array_equal(pooled.count, count)
  assert pooled.mean.dtype == pooled.var.dtype == jnp.float32


@pytest.mark.parametrize('run', ['eager', 'jit'])
def test_accumulator_pools_unequal_batches_like_numpy(run):
  xs = _batches((3, 10, 1, 25, 7))
  update = precise.update if run == 'eager' else jax.jit(precise.update)
  state = precise.init({'layer': _template()})
  for x in xs:
    state = update(state, {'layer': _moments(x)})
  _assert_pooled(precise.finalize(state)['layer'], xs)


def test_accumulator_under_scan_with_masked_batches():
  # Unequal numbers of valid examples in fixed-shape batches: counts differ per batch.
  rng = np.random.default_rng(1)
  x = rng.normal(2.0, 3.0, (5, 12, 4, C)).astype(np.float32) + np.arange(5.0)[:, None, None, None]
  valid = np.array([12, 3, 0, 7, 1])
  masks = np.arange(12)[None, :] < valid[:, None]

  def step(state, batch):
    xb, mask = batch
    return precise.update(state, _moments(xb, mask[:, None, None])), None

  state, _ = jax.jit(lambda s, b: jax.lax.scan(step, s, b))(precise.init(_template()), (x, masks))
  _assert_pooled(precise.finalize(state), [x[k, :n] for k, n in enumerate(valid)])


def test_large_mean_keeps_the_variance():
  xs = _batches((16, 5, 33, 8), seed=2, loc=1e4)
  batches = [_moments(x) for x in xs]
  state = precise.init(_template())
  for m in batches:
    state = precise.update(state, m)
  pooled = precise.finalize(state)
  # The pooling itself is exact: float64 pooling of the same float32 batch moments.
  counts = np.array([float(m.count[0]) for m in batches])[:, None]
  means, variances = (np.stack([np.asarray(getattr(m, f), np.float64) for m in batches]) for f in ('mean', 'var'))
  mean64 = (counts * means).sum(0) / counts.sum()
  var64 = (counts * (variances + (means - mean64) ** 2)).sum(0) / counts.sum()
  np.testing.assert_allclose(pooled.mean, mean64, rtol=1e-7)
  np.testing.assert_allclose(pooled.var, var64, rtol=1e-6)
  # Against the data, what is lost is the float32 rounding of the batch means near 1e4 (spacing 1e-3),
  # where a float32 sum of squares (x**2 ~ 1e8, 7 digits) loses the variance entirely.
  mean, var, _ = _numpy_moments(xs)
  np.testing.assert_allclose(pooled.var, var, rtol=1e-3)
  x = np.concatenate(xs).reshape(-1, C)
  one_pass = np.mean(x * x, 0, dtype=np.float32) - np.mean(x, 0, dtype=np.float32) ** 2
  assert np.all(np.abs(one_pass - var) > 0.5)


def test_a_batch_with_count_zero_changes_nothing():
  xs = _batches((4, 6))
  state = precise.update(precise.init(_template()), _moments(xs[0]))
  empty = _moments(xs[1], jnp.zeros((6, 1, 1), bool))
  jax.tree.map(np.testing.assert_array_equal, precise.update(state, empty), state)


# ----------------------------------------------------------------------------
# precise_statistics: a "model" of one linear layer followed by BN.

W = np.random.default_rng(3).normal(size=(5, C)).astype(np.float32)
S, B = 6, 8


def _data(seed=4):
  rng = np.random.default_rng(seed)
  images = (rng.normal(1.5, 2.0, (S, B, 5)) + np.arange(S)[:, None, None]).astype(np.float32)
  labels = rng.integers(0, 10, (S, B)).astype(np.int32)
  return images, labels


def _moments_fn(batch):
  """The BN layer's batch moments in a training pass: its input is `images @ W`."""
  images, _ = batch
  return {'bn': batch_moments(images @ W, (0,))}


def _layer_input(images):
  return [np.asarray(images[k], np.float64) @ W.astype(np.float64) for k in range(len(images))]


def _check(pooled, images):
  mean, var, count = _numpy_moments(_layer_input(images))
  assert pooled['bn'].mean.shape == (1, C)  # the moments keep their shape
  np.testing.assert_allclose(pooled['bn'].mean.ravel(), mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pooled['bn'].var.ravel(), var, rtol=1e-5)
  np.testing.assert_array_equal(pooled['bn'].count, count)


def test_stacked_batches_give_the_population_statistics():
  images, labels = _data()
  _check(precise.precise_statistics(_moments_fn, (images, labels), num_examples=None), images)
  # Default 10^4 examples: more than there are, so every batch.
  _check(bnjax.precise_statistics(_moments_fn, (jnp.asarray(images), jnp.asarray(labels))), images)


def test_an_iterable_of_batches_gives_the_same_statistics():
  images, labels = _data()
  batches = [(images[k], labels[k]) for k in range(S)]
  _check(precise.precise_statistics(_moments_fn, batches, num_examples=None), images)
  _check(precise.precise_statistics(_moments_fn, iter(batches)), images)


@pytest.mark.parametrize('num_examples, num_batches', [(1, 1), (8, 1), (9, 2), (20, 3), (48, 6), (1000, 6)])
def test_num_examples_uses_the_first_whole_batches(num_examples, num_batches):
  assert num_batches == min(S, math.ceil(num_examples / B))
  images, labels = _data()
  _check(precise.precise_statistics(_moments_fn, (images, labels), num_examples=num_examples),
         images[:num_batches])
  read = []

  def generate():
    for k in range(S):
      read.append(k)
      yield images[k], labels[k]

  _check(precise.precise_statistics(_moments_fn, generate(), num_examples=num_examples), images[:num_batches])
  assert len(read) == num_batches  # the iterator is not read beyond the batch that reaches num_examples


def test_mean_is_pytorch_update_bn_with_equal_batches_and_the_variance_adds_the_spread_of_batch_means():
  # PyTorch's update_bn (momentum=None) averages the batch means and the unbiased batch variances.
  images, labels = _data()
  pooled = precise.precise_statistics(_moments_fn, (images, labels), num_examples=None)['bn']
  inputs = _layer_input(images)
  batch_means = np.stack([x.mean(0) for x in inputs])
  unbiased = np.stack([x.var(0, ddof=1) for x in inputs])
  np.testing.assert_allclose(pooled.mean.ravel(), batch_means.mean(0), rtol=1e-5, atol=1e-5)
  # Ours: the biased variance of the population = mean biased batch variance + variance of the batch means.
  np.testing.assert_allclose(pooled.var.ravel(), np.concatenate(inputs).var(0), rtol=1e-5)
  np.testing.assert_allclose(
      pooled.var.ravel(), unbiased.mean(0) * (B - 1) / B + batch_means.var(0), rtol=1e-5
  )
  assert np.all(np.abs(pooled.var.ravel() - unbiased.mean(0)) > 1e-2)  # the batch means differ here


def test_leaves_that_are_not_moments_keep_their_last_value():
  images, labels = _data()
  fn = lambda batch: {**_moments_fn(batch), 'last_label': batch[1][0]}
  pooled = precise.precise_statistics(fn, (images, labels), num_examples=3 * B)
  assert int(pooled['last_label']) == labels[2, 0]
  _check(pooled, images[:3])


@pytest.mark.parametrize('batches, message', [
    ([], 'no batches'),
    ((np.zeros((0, B, 5)), np.zeros((0, B))), 'no batches'),
    ((np.zeros((S, B, 5)), np.zeros((S + 1, B))), 'same S and B'),
    ((np.zeros((S, B, 5)), 3), 'list or iterator'),
])
def test_bad_batches_are_errors(batches, message):
  with pytest.raises(ValueError, match=message):
    precise.precise_statistics(_moments_fn, batches)


@pytest.mark.parametrize('num_examples', [0, -5, 2.5, True])
def test_bad_num_examples_is_an_error(num_examples):
  with pytest.raises(ValueError, match='num_examples'):
    precise.precise_statistics(_moments_fn, _data(), num_examples=num_examples)


# ----------------------------------------------------------------------------
# with_population_statistics


def _pooled_moments(seed=5):
  rng = np.random.default_rng(seed)
  return Moments(
      mean=jnp.asarray(rng.normal(size=(1, C)), jnp.float32),
      var=jnp.asarray(rng.uniform(0.5, 2.0, (1, C)), jnp.float32),
      count=jnp.asarray([[40.0, 0.0, 40.0]]),  # feature 1 saw no valid entry
  )


def _stepped(state):
  return state._replace(step=jnp.asarray(7, jnp.int32), decay_product=jnp.asarray(0.25, jnp.float32),
                        **{f: getattr(state, f) + 0.5 for f in state._fields[:-2]})


def test_batch_norm_state_gets_the_pooled_mean_and_var():
  _, state = bnjax.batch_norm_init(C)
  state = _stepped(state)
  m = _pooled_moments()
  new = bnjax.with_population_statistics(state, m)
  assert isinstance(new, bnjax.BatchNormState)
  np.testing.assert_allclose(new.mean, [m.mean[0, 0], state.mean[1], m.mean[0, 2]])
  np.testing.assert_allclose(new.var, [m.var[0, 0], state.var[1], m.var[0, 2]])
  assert int(new.step) == 7 and float(new.decay_product) == 0.25
  as_dict = precise.with_population_statistics({**state._asdict(), 'other': 1}, m._asdict())
  assert as_dict['other'] == 1
  jax.tree.map(np.testing.assert_array_equal, {k: as_dict[k] for k in state._fields}, new._asdict())


def test_batch_renorm_state_gets_mean_and_std_and_inference_uses_them():
  eps = 1e-2
  params, state = bnjax.batch_renorm_init(C)
  params = {'scale': jnp.array([0.5, 2.0, 1.5]), 'bias': jnp.array([0.1, -1.0, 3.0])}
  state = _stepped(state)
  m = _pooled_moments()._replace(count=jnp.full((1, C), 40.0))
  new = precise.with_population_statistics(state, m, epsilon=eps)
  assert isinstance(new, bnjax.BatchRenormState)
  mean, var = np.asarray(m.mean[0], np.float64), np.asarray(m.var[0], np.float64)
  for field in ('mean', 'renorm_mean'):
    np.testing.assert_allclose(getattr(new, field), mean, rtol=1e-6)
  for field in ('std', 'renorm_std'):
    np.testing.assert_allclose(getattr(new, field), np.sqrt(var + eps), rtol=1e-6)
  assert int(new.step) == 7 and float(new.decay_product) == 0.25
  np.testing.assert_allclose(bnjax.moving_statistics(new, eps)[1], var, rtol=1e-5)

  x = np.random.default_rng(6).normal(size=(10, 4, C)).astype(np.float32)
  y, _ = bnjax.batch_renorm(jnp.asarray(x), params, new, training=False, epsilon=eps)
  want = (x - mean) / np.sqrt(var + eps) * np.asarray(params['scale']) + np.asarray(params['bias'])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)

  as_dict = precise.with_population_statistics(state._asdict(), m, eps)
  jax.tree.map(np.testing.assert_array_equal, as_dict, new._asdict())


def test_with_population_statistics_rejects_other_states():
  _, state = bnjax.batch_norm_init(C + 1)
  with pytest.raises(ValueError, match='features'):
    precise.with_population_statistics(state, _pooled_moments())
  with pytest.raises(ValueError, match='missing'):
    precise.with_population_statistics({'mean': jnp.zeros(C)}, _pooled_moments())
  with pytest.raises(TypeError, match='BatchNormState'):
    precise.with_population_statistics((jnp.zeros(C), jnp.ones(C)), _pooled_moments())


def test_core_does_not_import_flax_or_the_lab():
  code = (
      'import sys, bnjax.precise\n'
      "loaded = [m for m in ('flax', 'bnjax.linen', 'bnjax.lab') if m in sys.modules]\n"
      'assert not loaded, loaded\n'
  )
  env = dict(os.environ, PYTHONPATH=str(REPO))
  subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO, env=env, timeout=120)
