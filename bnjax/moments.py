"""Batch statistics: per-feature mean and biased variance over a (grouped) batch.

The one place where batch statistics are computed, for plain, ghost (grouped)
and cross-device batch norm alike.

Plain batch norm reduces `[N, ..., C]` over every axis but the feature axis;
ghost batch norm views the batch as `[G, n, ..., C]` (G groups of n examples)
and reduces over every axis but the group and feature axes. (Plain BN is not
run as one group: a leading size-1 axis makes XLA:CPU's backward pass up to
8x slower.)

Numerics:
- Reductions run in float32 (or wider, for float64 inputs), whatever the
  input dtype, so bfloat16/float16 activations do not overflow or lose the
  variance.
- The variance is computed in two passes, `mean((x - mean(x))**2)`, never as
  `mean(x**2) - mean(x)**2`: the one-pass form cancels catastrophically for
  inputs with a large mean (1e4 + N(0, 1) gives a variance of 0 or < 0 in
  float32, the bug of flax#1491), the two-pass form is exact to rounding.
- With `axis_name`, each device computes its own count, mean and sum of
  squared deviations M2 (two passes, locally), the devices exchange these in
  ONE collective (a psum of one-hot rows: an exact all-gather), and every
  device combines them exactly (Chan et al. 1979):

      n = sum_i n_i,  mean = sum_i n_i mean_i / n,
      M2 = sum_i M2_i + sum_i n_i (mean_i - mean)**2,

  with the rounding of each mean_i carried along (see `_combine`): at mean
  1e4 a float32 mean is off by up to 5e-4, which the last sum would square.

  Devices are weighted by their counts (the mean of per-device means is the
  bug of flax#2417), and no term cancels, so data with a large mean keep
  their variance. The gradient is the transpose of that one psum: one
  collective backward as well (two psums, of the sums and then of the
  squares, cost two rendezvous forward and two backward).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray


class Moments(NamedTuple):
  """Batch statistics, with the reduced axes kept (size 1) so they broadcast against the input.

  Attributes:
    mean: mean over the reduced axes.
    var: biased variance over the reduced axes.
    count: number of (unmasked) entries each statistic is over, summed over
      `axis_name` where one is given; same shape as `mean`.
  """

  mean: Array
  var: Array
  count: Array


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype statistics are computed in: float32 at least, and one JAX has.

  float64 is float32 unless `jax_enable_x64` is set: asking JAX for float64
  without it would warn that the dtype is truncated.
  """
  return jax.dtypes.canonicalize_dtype(jnp.promote_types(dtype, jnp.float32))


def _psum(value, axis_name, axis_index_groups):
  if axis_name is None:
    return value
  return jax.lax.psum(value, axis_name, axis_index_groups=axis_index_groups)


def _local_moments(x: Array, reduce_axes: tuple, mask: Array | None) -> tuple[Array, Array, Array, Array]:
  """`(count, mean, M2, S)` of x over `reduce_axes` on this device, in two passes.

  M2 = sum((x - mean)**2) and S = sum(x - mean), the sum that rounding `mean`
  leaves (0 but for rounding: with mean 1e4, `mean` is off by up to half a
  float32 ulp, 5e-4, which S records exactly enough to combine devices).
  """
  # The dtype JAX computes in (`total.dtype`), not x's: a float64 numpy x is summed in float32.
  if mask is None:
    local_count = 1
    for axis in reduce_axes:
      local_count *= x.shape[axis]
    total = jnp.sum(x, axis=reduce_axes, keepdims=True)
    count = jnp.full(total.shape, local_count, total.dtype)
  else:
    mask = jnp.broadcast_to(mask, x.shape)
    total = jnp.sum(jnp.where(mask, x, 0), axis=reduce_axes, keepdims=True)
    count = jnp.sum(mask, axis=reduce_axes, keepdims=True, dtype=total.dtype)
  mean = total / jnp.maximum(count, 1)
  centered = x - mean
  squares = centered * centered
  if mask is not None:
    centered = jnp.where(mask, centered, 0)
    squares = jnp.where(mask, squares, 0)
  return count, mean, jnp.sum(squares, axis=reduce_axes, keepdims=True), jnp.sum(centered, axis=reduce_axes, keepdims=True)


def _gather(stats: Array, axis_name: Any, axis_index_groups: Any) -> Array:
  """`[D, *stats.shape]`: every device's `stats` (of its group), in one psum.

  Each device writes its stats into its own row of zeros and the rows are
  summed: adding zeros is exact, so this is an all-gather, with psum's
  support for every mapped axis (shard_map, pmap, vmap) and for
  `axis_index_groups`, and an invariant result under shard_map.
  """
  index = jax.lax.axis_index(axis_name)
  if axis_index_groups is None:
    size = jax.lax.axis_size(axis_name)
  else:
    size = len(axis_index_groups[0])
    position = np.zeros(sum(len(group) for group in axis_index_groups), np.int32)
    for group in axis_index_groups:
      position[np.asarray(group)] = np.arange(len(group))
    index = jnp.asarray(position)[index]
  rows = jnp.arange(size).reshape((size,) + (1,) * stats.ndim) == index
  return _psum(jnp.where(rows, stats[None], 0), axis_name, axis_index_groups)


def _combine(local: tuple, axis_name: Any, axis_index_groups: Any) -> tuple[Array, Array, Array]:
  """`(count, mean, M2)` of the devices' data together, from each device's `_local_moments`, exactly.

  Chan et al.'s combination, about a reference H near the mean (the devices'
  rounded means averaged) so that no rounded mean enters a difference:
  with a_i = mean_i - H and e_i = a_i - (mean - H),

      mean = H + sum_i (n_i a_i + S_i) / n,
      M2 = sum_i (M2_i + 2 e_i S_i + n_i e_i**2),

  the sum over each device's x of (x - mean)**2 = ((x - mean_i) + e_i)**2.
  """
  counts, means, m2s, rests = _gather(jnp.stack(local), axis_name, axis_index_groups).swapaxes(0, 1)
  count = jnp.sum(counts, axis=0)
  per_valid = 1.0 / jnp.maximum(count, 1)
  reference = jnp.sum(counts * means, axis=0) * per_valid
  offsets = means - reference
  mean_offset = jnp.sum(counts * offsets + rests, axis=0) * per_valid
  deviations = offsets - mean_offset
  m2 = jnp.sum(m2s + deviations * (2.0 * rests + counts * deviations), axis=0)
  return count, reference + mean_offset, m2


def batch_moments(
    x: Array,
    reduce_axes: Sequence[int],
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> Moments:
  """Mean and biased variance of `x` over `reduce_axes`, in two passes.

  Args:
    x: `[N, ..., C]` input (or `[G, n, ..., C]` for grouped statistics), in
      the compute dtype.
    reduce_axes: the axes to reduce.
    mask: optional booleans broadcastable to `x`; False entries are left out
      of the statistics. Statistics over no valid entry are 0 (and their
      count 0, which callers use to skip updates).
    axis_name: optional name of a mapped axis (shard_map, pmap, vmap) over
      which the statistics are combined (one collective, see the module
      doc): the statistics of the global batch.
    axis_index_groups: optional subgroups of `axis_name` (pmap only).

  Returns:
    `Moments` whose arrays have x's shape with `reduce_axes` set to 1.
  """
  local = _local_moments(x, tuple(reduce_axes), mask)
  if axis_name is None:
    count, mean, m2, _ = local
  else:
    count, mean, m2 = _combine(local, axis_name, axis_index_groups)
  # Without the barrier XLA:CPU fuses the second reduction into the loop that
  # consumes the statistics, which makes the forward pass 4x slower.
  return jax.lax.optimization_barrier(Moments(mean=mean, var=m2 / jnp.maximum(count, 1), count=count))


def pooled_moments(
    moments: Moments,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> Moments:
  """Count-weighted average over the group axis 0: what ghost BN's moving averages track.

  For ghost batch norm this is the mean of the group means and of the group
  variances (Hoffer et al. 2017), weighted by each group's count so that
  masked examples count exactly. With `axis_name` the groups of every device
  are pooled, so moving statistics stay identical on all devices even when
  each device normalizes its own groups.

  Args:
    moments: per-group statistics with the group axis first, `[G, 1, ..., C]`
      (G may be 1: the statistics of a whole local batch, `[1, ..., C]`).
    axis_name: mapped axis whose groups are pooled too (None: local groups only).
    axis_index_groups: optional subgroups of `axis_name`.

  Returns:
    `Moments` with the group axis reduced away.
  """
  weights = moments.count
  total = jnp.sum(weights, axis=0)
  mean_sum = jnp.sum(moments.mean * weights, axis=0)
  var_sum = jnp.sum(moments.var * weights, axis=0)
  total, mean_sum, var_sum = _psum((total, mean_sum, var_sum), axis_name, axis_index_groups)
  safe_total = jnp.maximum(total, 1)
  return Moments(mean=mean_sum / safe_total, var=var_sum / safe_total, count=total)
