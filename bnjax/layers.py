"""What bnjax's Flax layers (`bnjax.linen`, `bnjax.nnx`) share, without Flax.

A layer stores its statistics as a dict of arrays (flax's `batch_stats`
entries, or NNX's `nnx.BatchStat` attributes) and calls one pure function of
`bnjax.norm` with them. This module turns such a dict into the core's state,
runs the pure function, and turns the new state back into a dict with the
shapes and dtypes given in, so that both layers are thin shells and every
number comes from the core.

What a layer stores (`stored_fields`): the statistics (`mean`, `var` for
batch norm, as flax does; `mean`, `std`, `renorm_mean`, `renorm_std` for
batch renorm), plus `step` only when a hyperparameter is a schedule (or the
momentum is None, the cumulative average) and `decay_product` only with
`debias`. A checkpoint written by `flax.linen.BatchNorm` or `nnx.BatchNorm`
(only `mean` and `var`) thus loads as it is; a missing `step` or
`decay_product` reads as its start value (0, 1). Entries are read in the
dtype the core computes in and written back in the dtype they had: a user's
`jax.lax.pmean` over `batch_stats` (which makes an int32 `step` float32)
changes nothing.

Feature axes: `axis` may be an int or a tuple of ints (as in flax.linen);
several feature axes are moved last and merged into one for the core, and
the statistics and parameters have their shape, `[x.shape[a] for a in axes]`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import moments as moments_lib
from bnjax import norm as norm_lib
from bnjax import precise

Array = jnp.ndarray


class Kind(NamedTuple):
  """One pure function of the core with its init and state type."""

  init: Callable
  apply: Callable
  state_type: type


BATCH_NORM = Kind(norm_lib.batch_norm_init, norm_lib.batch_norm, norm_lib.BatchNormState)
BATCH_RENORM = Kind(norm_lib.batch_renorm_init, norm_lib.batch_renorm, norm_lib.BatchRenormState)

SCALAR_FIELDS = ('step', 'decay_product')
_START_VALUES = {'step': (0, jnp.int32), 'decay_product': (1.0, jnp.float32)}
# The options that may be schedules `step -> value` (read with the stored step).
SCHEDULE_OPTIONS = ('momentum', 'renorm_momentum', 'rmax', 'dmax')


def renorm_options(batch_norm_options: Mapping[str, Any], **renorm: Any) -> dict:
  """A BatchRenorm layer's keyword options: its BatchNorm options but `unbiased_moving_var`, and `renorm`'s.

  Raises:
    ValueError: `unbiased_moving_var` is set (PyTorch's running variance; PyTorch has no batch renorm).
  """
  if batch_norm_options.get('unbiased_moving_var'):
    raise ValueError('BatchRenorm: unbiased_moving_var is an option of BatchNorm only (PyTorch has no batch renorm).')
  return {name: value for name, value in batch_norm_options.items() if name != 'unbiased_moving_var'} | renorm


def stored_fields(state_type: type, options: Mapping[str, Any]) -> tuple[str, ...]:
  """The state fields a layer with these options stores (see the module doc).

  `step` is stored when the momentum is None or any of `SCHEDULE_OPTIONS` is
  callable; `decay_product` when `options['debias']`.
  """
  fields = [field for field in state_type._fields if field not in SCALAR_FIELDS]
  reads_step = ('momentum' in options and options['momentum'] is None) or any(
      callable(options.get(name)) for name in SCHEDULE_OPTIONS
  )
  if reads_step:
    fields.append('step')
  if options.get('debias'):
    fields.append('decay_product')
  return tuple(fields)


def start_value(state_type: type, field: str, feature_shape: tuple, dtype=jnp.float32) -> Array:
  """The initial value of one state field: statistics `feature_shape` in `dtype`, scalars as the core's."""
  if field in _START_VALUES:
    value, scalar_dtype = _START_VALUES[field]
    return jnp.asarray(value, scalar_dtype)
  kind = BATCH_RENORM if state_type is norm_lib.BatchRenormState else BATCH_NORM
  _, state = kind.init(1)
  return jnp.full(feature_shape, getattr(state, field)[0], dtype)


def feature_axes(ndim: int, axis: int | tuple) -> tuple[int, ...]:
  """`axis` (an int or a tuple of ints) as sorted non-negative axes of an array of rank `ndim`."""
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  if not axes or any(not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim for a in axes):
    raise ValueError(f'axis={axis!r} is not an axis (or a tuple of axes) of an input of rank {ndim}.')
  return tuple(sorted({int(a) % ndim for a in axes}))


def as_state(state_type: type, stats: Mapping[str, Array]):
  """One layer's stored statistics as the core state: `[C]` float32 vectors, missing scalars at their start.

  Raises:
    ValueError: a statistic of `state_type` is missing.
  """
  missing = [field for field in state_type._fields if field not in stats and field not in SCALAR_FIELDS]
  if missing:
    raise ValueError(
        f'the statistics have keys {sorted(stats)}, missing {missing} of a {state_type.__name__}; '
        'pass the statistics of one bnjax layer of that kind.'
    )
  fields = {}
  for field in state_type._fields:
    if field == 'step':
      step = stats.get('step', 0)
      # A pmean over batch_stats makes the step a float: round it back.
      fields[field] = jnp.round(jnp.asarray(step)).astype(jnp.int32)
    elif field == 'decay_product':
      fields[field] = jnp.asarray(stats.get('decay_product', 1.0), jnp.float32)
    else:
      fields[field] = jnp.reshape(jnp.asarray(stats[field], jnp.float32), (-1,))
  return state_type(**fields)


def output_dtype(dtype, *arrays) -> jnp.dtype:
  """flax's rule for a layer's result dtype: `dtype`, else the result type of `arrays` (at least inexact).

  The same as `flax.linen.dtypes.canonicalize_dtype(*arrays, dtype=dtype)`.
  """
  if dtype is None:
    dtype = jnp.result_type(*(jnp.asarray(a) for a in arrays if a is not None))
    if not jnp.issubdtype(dtype, jnp.inexact):
      dtype = jnp.promote_types(jnp.float32, dtype)
  return jnp.dtype(dtype)


def apply(
    kind: Kind,
    x: Array,
    params: Mapping[str, Array],
    stats: Mapping[str, Array],
    *,
    training: bool,
    axis: int | tuple,
    options: Mapping[str, Any],
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> tuple[Array, dict]:
  """Runs `kind.apply` on a layer's parameters and stored statistics.

  Args:
    kind: `BATCH_NORM` or `BATCH_RENORM`.
    x: `[N, ..., C]` input (feature axes anywhere but 0).
    params: `scale` and/or `bias`, each of the feature shape.
    stats: the stored statistics (`stored_fields`), each statistic of the
      feature shape, in any float dtype; a missing `step`/`decay_product` is
      at its start value.
    training, options, mask, axis_name, axis_index_groups: as the core's
      `training`, keyword options (`momentum`, `epsilon`, ...), `mask`,
      `axis_name` and `axis_index_groups`.
    axis: the feature axis, or a tuple of them.

  Returns:
    `(y, new_stats)`: y of x's shape in the core's output dtype (x's, or
    float32 for integer x); `new_stats` with the keys of `stats`, each with
    its shape and dtype (unchanged unless training).
  """
  axes = feature_axes(jnp.ndim(x), axis)
  x = jnp.asarray(x)
  num_features = math.prod(x.shape[a] for a in axes)
  if len(axes) == 1:
    core_x, core_axis, core_mask = x, axes[0], mask
  else:
    # Several feature axes: move them last and merge them into one.
    last = tuple(range(x.ndim - len(axes), x.ndim))
    moved = jnp.moveaxis(x, axes, last)
    core_x, core_axis = moved.reshape(moved.shape[:-len(axes)] + (num_features,)), -1
    core_mask = mask
    if mask is not None and jnp.ndim(mask) == x.ndim:
      core_mask = jnp.moveaxis(jnp.broadcast_to(mask, x.shape), axes, last).reshape(core_x.shape)
  flat_params = {name: jnp.reshape(value, (num_features,)) for name, value in params.items()}
  state = as_state(kind.state_type, stats)
  y, new_state = kind.apply(
      core_x, flat_params, state, training=training, axis=core_axis, mask=core_mask,
      axis_name=axis_name, axis_index_groups=axis_index_groups, **options,
  )
  if len(axes) > 1:
    y = jnp.moveaxis(y.reshape(moved.shape), last, axes)
  new_stats = {
      field: jnp.reshape(getattr(new_state, field), jnp.shape(value)).astype(jnp.asarray(value).dtype)
      for field, value in stats.items()
  }
  return y, new_stats


def input_moments(
    x: Array, axis: int | tuple, mask: Array | None = None, axis_name: Any = None, axis_index_groups: Any = None
) -> moments_lib.Moments:
  """The moments of a layer's input over its whole batch, for precise BN: `Moments` of `[C]` vectors.

  Mean and biased variance of x over every axis but the feature axes (ghost
  BN's groups included: the moments of the whole batch, not of each group),
  leaving out masked entries, over the global batch under `axis_name`, in
  float32 at least, without gradient; `count` the number of entries per
  feature (masks may differ per feature). C is the product of the feature
  axes' sizes.
  """
  x = jnp.asarray(x)
  axes = feature_axes(x.ndim, axis)
  reduce_axes = tuple(a for a in range(x.ndim) if a not in axes)
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    if mask.ndim == 1:
      mask = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
  batch = moments_lib.batch_moments(
      x.astype(moments_lib.compute_dtype(x.dtype)), reduce_axes, mask, axis_name, axis_index_groups
  )
  return jax.lax.stop_gradient(moments_lib.Moments(*(jnp.reshape(a, (-1,)) for a in batch)))


def pool_moments(earlier: moments_lib.Moments | None, batch: moments_lib.Moments) -> moments_lib.Moments:
  """The moments of two sets of entries together (a layer called twice in one pass); `earlier` may be None."""
  if earlier is None:
    return batch
  return precise.finalize(precise.update(precise.update(precise.init(batch), earlier), batch))
