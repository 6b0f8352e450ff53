"""bnjax.moments: batch statistics, masks, pooling of group statistics."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import moments


def test_batch_moments_equal_numpy_two_pass():
  x = np.random.default_rng(0).normal(3.0, 2.0, (6, 4, 4, 5)).astype(np.float32)
  m = moments.batch_moments(jnp.asarray(x), (0, 1, 2))
  assert m.mean.shape == (1, 1, 1, 5)
  np.testing.assert_allclose(m.mean.ravel(), x.mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(m.var.ravel(), x.var((0, 1, 2)), rtol=1e-5)
  np.testing.assert_array_equal(m.count.ravel(), np.full(5, 6 * 4 * 4))


def test_batch_moments_with_a_per_feature_mask():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(20, 3)).astype(np.float32)
  mask = rng.random((20, 3)) > 0.4
  m = moments.batch_moments(jnp.asarray(x), (0,), jnp.asarray(mask))
  for c in range(3):
    valid = x[mask[:, c], c]
    np.testing.assert_allclose(m.mean[0, c], valid.mean(), rtol=1e-5)
    np.testing.assert_allclose(m.var[0, c], valid.var(), rtol=1e-5)
    assert m.count[0, c] == mask[:, c].sum()


def test_empty_mask_gives_zero_statistics_and_count():
  m = moments.batch_moments(jnp.ones((4, 2)), (0,), jnp.zeros((4, 1), bool))
  np.testing.assert_array_equal(m.mean, 0.0)
  np.testing.assert_array_equal(m.var, 0.0)
  np.testing.assert_array_equal(m.count, 0.0)


def test_statistics_across_a_named_axis_keep_the_variance_of_data_with_a_large_mean():
  # 4 "devices" (vmap with an axis name: the same collective as shard_map's) with 1e4 + N(0, 1) + a
  # per-device shift and 1..4 valid examples of 4: a one-pass sum of squares cancels here (flax#1491).
  rng = np.random.default_rng(3)
  x = (1e4 + np.arange(4)[:, None, None] * 0.5 + rng.normal(size=(4, 4, 3))).astype(np.float32)
  mask = np.arange(4)[None, :, None] <= np.arange(4)[:, None, None]
  m = jax.vmap(lambda x, mask: moments.batch_moments(x, (0,), mask, axis_name='i'), axis_name='i')(x, mask)
  valid = x.astype(np.float64)[np.broadcast_to(mask, x.shape)].reshape(-1, 3)
  np.testing.assert_allclose(m.mean[:, 0], np.broadcast_to(valid.mean(0), (4, 3)), rtol=1e-7, atol=0)
  np.testing.assert_allclose(m.var[:, 0], np.broadcast_to(valid.var(0), (4, 3)), rtol=1e-5)
  np.testing.assert_array_equal(m.count, 10)
  one_pass = np.mean(valid.astype(np.float32) ** 2, 0) - np.mean(valid.astype(np.float32), 0) ** 2
  assert np.max(np.abs(one_pass - valid.var(0))) > 0.1


def test_pooled_moments_weight_groups_by_count():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 10, 3)).astype(np.float32)
  mask = np.zeros((2, 10, 1), bool)
  mask[0, :2] = True  # group 0: 2 valid examples
  mask[1, :8] = True  # group 1: 8 valid examples
  groups = moments.batch_moments(jnp.asarray(x), (1,), jnp.asarray(mask))
  pooled = moments.pooled_moments(groups)
  means = [x[0, :2].mean(0), x[1, :8].mean(0)]
  variances = [x[0, :2].var(0), x[1, :8].var(0)]
  np.testing.assert_allclose(pooled.mean.ravel(), (2 * means[0] + 8 * means[1]) / 10, rtol=1e-5)
  np.testing.assert_allclose(pooled.var.ravel(), (2 * variances[0] + 8 * variances[1]) / 10, rtol=1e-5)
  np.testing.assert_array_equal(pooled.count.ravel(), 10)


def test_compute_dtype_is_at_least_float32():
  assert moments.compute_dtype(jnp.bfloat16) == jnp.float32
  assert moments.compute_dtype(jnp.float16) == jnp.float32
  assert moments.compute_dtype(jnp.float32) == jnp.float32


def test_compute_dtype_is_what_jax_computes_in():
  # Without jax_enable_x64, float64 is computed in float32: asking for it would warn.
  assert moments.compute_dtype(np.float64) == jnp.asarray(np.zeros(1)).dtype
  assert moments.compute_dtype(np.int64) == jnp.float32


def test_batch_moments_of_a_float64_numpy_array_emit_no_dtype_warning():
  x = np.random.default_rng(4).normal(2.0, 3.0, (12, 3))
  mask = np.arange(12)[:, None] % 4 != 0
  for m in (None, mask):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      got = moments.batch_moments(x, (0,), m)
    assert not caught, [str(w.message) for w in caught]
    valid = x if m is None else x[m[:, 0]]
    np.testing.assert_allclose(got.mean.ravel(), valid.mean(0), rtol=1e-5)
    np.testing.assert_allclose(got.var.ravel(), valid.var(0), rtol=1e-5)
