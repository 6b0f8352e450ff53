"""Batch normalization and batch renormalization as pure functions.

Each function takes its moving statistics as an explicit state (a NamedTuple
pytree) and returns the updated state: nothing is mutated, nothing is hidden,
and forgetting to keep the new state is visible in the code that drops it.
Everything works under `jit`, `grad`, `vmap` (over parameter/state sets and
over hyperparameters such as momentum) and `lax.scan`.

    params, state = batch_norm_init(64)
    y, state = batch_norm(x, params, state, training=True)    # x: [N, ..., 64]
    y, _ = batch_norm(x, params, state, training=False)       # moving statistics

Conventions:
- The batch axis is axis 0; the feature axis is `axis` (default -1, i.e. NHWC
  for images and `[N, C]` for dense layers). Statistics reduce over every
  other axis.
- Momentum is the weight of the old moving average (Keras/Flax):
  `moving = momentum * moving + (1 - momentum) * batch`. PyTorch's 0.1 is 0.9
  here (`bnjax.schedules.momentum_from_pytorch`). `momentum=None` gives the
  cumulative moving average (batch k gets weight 1 / (k + 1)). A momentum
  outside [0, 1] is an error where its value is known and clipped to [0, 1]
  under jit (an overshooting schedule would make the variance negative).
- Training needs more than one value per feature: a batch (or ghost batch) of
  one dense example is refused, as PyTorch does (every value would be 0).
- `debias=True` corrects the moving averages for their initial value, like
  Adam's bias correction: after the first update the moving statistics equal
  the batch statistics, whatever the momentum and the initial state.
- Batch statistics are computed in float32 (see `bnjax.moments`); the output
  has the input's dtype. Integer and bool inputs are normalized as float32
  (as flax and haiku do) and give float32 outputs; float64 inputs are float32
  unless `jax_enable_x64` is set (without JAX's truncation warning). Complex
  inputs are rejected. The state keeps its float32 statistics either way.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import moments as moments_lib
from bnjax.normalize import normalize
from bnjax.schedules import ScalarOrSchedule, as_schedule

Array = jnp.ndarray
Params = dict


class BatchNormState(NamedTuple):
  """Moving statistics of batch norm.

  Attributes:
    mean: `[C]` moving mean, starts at 0.
    var: `[C]` moving (biased) variance, starts at 1.
    step: `[]` int32, number of training updates applied so far.
    decay_product: `[]` float32, product of the momentums applied so far
      (1 at the start); used by `debias=True`.
  """

  mean: Array
  var: Array
  step: Array
  decay_product: Array


class BatchRenormState(NamedTuple):
  """Moving statistics of batch renormalization (Ioffe 2017, Algorithm 1).

  Attributes:
    mean: `[C]` moving mean for inference, updated with `momentum`.
    std: `[C]` moving standard deviation `sqrt(var_B + epsilon)` for
      inference, updated with `momentum`; starts at 1. Inference uses the
      variance `max(std**2 - epsilon, 0)` (as Keras does).
    renorm_mean: `[C]` the mu of the paper, updated with `renorm_momentum`;
      used for the correction d during training.
    renorm_std: `[C]` the sigma of the paper, updated with
      `renorm_momentum`; starts at 1; used for r and d during training.
    step: `[]` int32, number of training updates applied so far.
    decay_product: `[]` float32, product of the `momentum`s applied so far.
  """

  mean: Array
  std: Array
  renorm_mean: Array
  renorm_std: Array
  step: Array
  decay_product: Array


def _init_params(num_features: int, center: bool, scale: bool, dtype) -> Params:
  if not isinstance(num_features, (int, np.integer)) or num_features < 1:
    raise ValueError(f'num_features={num_features!r} must be a positive int (the size of the feature axis).')
  params = {}
  if scale:
    params['scale'] = jnp.ones((num_features,), dtype)
  if center:
    params['bias'] = jnp.zeros((num_features,), dtype)
  return params


def batch_norm_init(
    num_features: int, *, center: bool = True, scale: bool = True, dtype=jnp.float32
) -> tuple[Params, BatchNormState]:
  """Parameters and moving statistics for `batch_norm`.

  Args:
    num_features: size C of the feature axis.
    center: learn a shift `bias` (beta), initialised to 0. Turn off when the
      next layer has its own bias or is invariant to shifts.
    scale: learn a scale `scale` (gamma), initialised to 1. Turn off when the
      next layer is linear (the source: BN after the nonlinearity).
    dtype: dtype of the parameters. Moving statistics are always float32.

  Returns:
    `(params, state)`: `params` a dict with `scale` `[C]` and `bias` `[C]`
    (each left out when turned off), `state` a `BatchNormState`.
  """
  params = _init_params(num_features, center, scale, dtype)
  state = BatchNormState(
      mean=jnp.zeros((num_features,), jnp.float32),
      var=jnp.ones((num_features,), jnp.float32),
      step=jnp.zeros((), jnp.int32),
      decay_product=jnp.ones((), jnp.float32),
  )
  return params, state


def batch_renorm_init(
    num_features: int, *, center: bool = True, scale: bool = True, dtype=jnp.float32
) -> tuple[Params, BatchRenormState]:
  """Parameters and moving statistics for `batch_renorm`; see `batch_norm_init`."""
  params = _init_params(num_features, center, scale, dtype)
  # One array per field: a buffer shared by two fields could not be donated under jit.
  zeros = lambda: jnp.zeros((num_features,), jnp.float32)
  ones = lambda: jnp.ones((num_features,), jnp.float32)
  state = BatchRenormState(
      mean=zeros(),
      std=ones(),
      renorm_mean=zeros(),
      renorm_std=ones(),
      step=jnp.zeros((), jnp.int32),
      decay_product=jnp.ones((), jnp.float32),
  )
  return params, state


# ----------------------------------------------------------------------------
# Argument checks: at trace time, on Python/numpy values (traced values, such
# as a momentum that is being vmapped over, cannot be checked and are not).


def _concrete(value):
  if value is None or callable(value) or isinstance(value, jax.core.Tracer):
    return None
  return np.asarray(value)


def _check_range(fn, name, value, low, high, *, low_open=False, hint=''):
  v = _concrete(value)
  if v is None:
    return
  below = v <= low if low_open else v < low
  if np.any(below) or np.any(v > high) or np.any(np.isnan(v)):
    low_bracket = '(' if low_open else '['
    high_text = 'inf)' if high == np.inf else f'{high}]'
    raise ValueError(
        f'{fn}: {name}={value!r} is outside {low_bracket}{low}, {high_text}.{hint}'
    )


_MOMENTUM_HINT = (
    ' It is the weight of the old moving average (Keras/Flax convention); '
    "PyTorch's momentum m is 1 - m here."
)


class _Layout(NamedTuple):
  """How the input `[N, ..., C]` is viewed and reduced in training.

  Plain BN reduces x as it is; ghost BN views it as `[G, N / G, ..., C]`.
  (Plain BN is not run as one group: a leading size-1 axis makes XLA:CPU's
  backward pass up to 8x slower.)
  """

  view_shape: tuple  # the shape x is reshaped to for the statistics
  reduce_axes: tuple  # axes of the view that statistics reduce over
  feature_shape: tuple  # how [C] vectors broadcast against x: [1, ..., C, ...]
  view_feature_shape: tuple  # how [C] vectors broadcast against the view
  ghost: bool  # virtual batches: statistics local to each group (and device)
  grouped: bool  # whether the view has a leading group axis (more than one group)


def _layout(fn, x, axis, virtual_batch_size, mask, training=True) -> _Layout:
  if x.ndim < 2:
    raise ValueError(
        f'{fn}: x has shape {x.shape} (rank {x.ndim}); expected rank >= 2, '
        '[N, C] for dense or [N, H, W, C] for conv activations.'
    )
  if not isinstance(axis, (int, np.integer)) or not -x.ndim <= axis < x.ndim:
    raise ValueError(f'{fn}: axis={axis!r} is not a valid axis of x with shape {x.shape}.')
  feature_axis = axis % x.ndim
  if feature_axis == 0:
    raise ValueError(f'{fn}: axis={axis!r} is the batch axis; the feature axis must be another one.')
  num_features = x.shape[feature_axis]
  batch = x.shape[0]
  # Inference normalizes each example with the moving statistics: any batch size will do.
  if virtual_batch_size is not None and (
      not isinstance(virtual_batch_size, (int, np.integer))
      or virtual_batch_size < 1
      or (training and batch % virtual_batch_size)
  ):
    raise ValueError(
        f'{fn}: virtual_batch_size={virtual_batch_size!r} must be a positive int that '
        f'divides the batch size {batch}.'
    )
  if mask is not None:
    mask_shape = np.shape(mask)
    ok = mask_shape == (batch,)
    if not ok and len(mask_shape) == x.ndim:
      ok = mask_shape[0] == batch and all(m in (1, n) for m, n in zip(mask_shape, x.shape))
    if not ok:
      raise ValueError(
          f'{fn}: mask has shape {mask_shape}; expected [N] = [{batch}] or a shape '
          f'broadcastable to x {x.shape} with the batch axis in full.'
      )
  feature_shape = tuple(num_features if a == feature_axis else 1 for a in range(x.ndim))
  ghost = virtual_batch_size is not None
  if ghost and virtual_batch_size < batch:
    view_shape = (batch // virtual_batch_size, virtual_batch_size) + x.shape[1:]
    reduce_axes = tuple(a for a in range(1, len(view_shape)) if a != feature_axis + 1)
    return _Layout(view_shape, reduce_axes, feature_shape, (1,) + feature_shape, True, True)
  reduce_axes = tuple(a for a in range(x.ndim) if a != feature_axis)
  return _Layout(x.shape, reduce_axes, feature_shape, feature_shape, ghost, False)


def _real_float_input(fn, x) -> Array:
  """x as a JAX array of a floating dtype, the dtype of the output.

  Integers and bools become float32, as in flax and haiku (an integer output
  would truncate the normalized values). `jnp.asarray` gives the dtype JAX
  computes in: a float64 numpy array is float32 without `jax_enable_x64`, with
  no truncation warning (asking for float64 later would warn).
  """
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise ValueError(
        f'{fn}: x has dtype {x.dtype}; expected real numbers (float, integer or bool). Batch '
        'statistics of complex values are not defined here: pass jnp.real(x), jnp.abs(x), or the real '
        'and imaginary parts as separate features (jnp.concatenate([x.real, x.imag], axis)).'
    )
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return x


_SCALAR_FIELDS = ('step', 'decay_product')


def _check_state_and_params(fn, params, state, state_type, x_shape, axis):
  """Checks that the state is a `state_type` whose fields, and the params, have their shapes.

  Every vector (state statistics, `scale`, `bias`) must be `[C]` with C the
  size of x's feature `axis`; `step` and `decay_product` must be scalars.
  """
  init = f'{fn}_init'
  missing = [field for field in state_type._fields if not hasattr(state, field)]
  if missing:
    raise ValueError(
        f'{fn}: state is a {type(state).__name__} without {missing}; expected a {state_type.__name__}, '
        f'from {init} or from the previous call of {fn}.'
    )
  num_features = x_shape[axis]
  vectors = {f'state.{field}': getattr(state, field) for field in state_type._fields if field not in _SCALAR_FIELDS}
  vectors.update({f"params['{name}']": value for name, value in params.items()})
  wrong = {name: np.shape(value) for name, value in vectors.items() if np.shape(value) != (num_features,)}
  if len(wrong) == len(vectors) and len(set(wrong.values())) == 1:
    raise ValueError(
        f'{fn}: x has {num_features} features on axis {axis} (shape {x_shape}) but params and state have '
        f'shape {next(iter(wrong.values()))}; initialise them with the feature size of x: {init}({num_features}).'
    )
  if wrong:
    name, shape = next(iter(wrong.items()))
    raise ValueError(
        f'{fn}: {name} has shape {shape}, expected ({num_features},), one value per feature of x '
        f'(axis {axis} of shape {x_shape}); pass the params and state of {init}({num_features}) '
        f'or those the previous call of {fn} used and returned.'
    )
  for field in _SCALAR_FIELDS:
    shape = np.shape(getattr(state, field))
    if shape != ():
      raise ValueError(
          f'{fn}: state.{field} has shape {shape}, expected (), a scalar; pass the state of {init} or of '
          f'the previous call of {fn} (under vmap over states, map every field of the state).'
      )


def _check_training(fn, training):
  if not isinstance(training, (bool, np.bool_)):
    raise ValueError(
        f'{fn}: training={training!r} must be a Python bool (it selects the code path at '
        'trace time); pass it as a static argument under jit.'
    )


def _mask_view(mask, layout: _Layout, x_shape: tuple):
  """The mask as booleans broadcastable to `layout.view_shape`."""
  if mask is None:
    return None
  mask = jnp.asarray(mask, bool)
  if mask.ndim == 1:
    mask = mask.reshape(mask.shape + (1,) * (len(x_shape) - 1))
  if layout.grouped:
    return mask.reshape(layout.view_shape[:2] + mask.shape[1:])
  return mask


# ----------------------------------------------------------------------------
# The computations.


def _check_more_than_one_value(x_shape, layout, mask, axis_name):
  """Training on one value per feature normalizes it to 0: the output is the bias and no gradient reaches the
  layer below. Refused where that is known at trace time (no mask, no cross-device statistics), as PyTorch does."""
  values = math.prod(layout.view_shape[a] for a in layout.reduce_axes)
  if values == 1 and mask is None and axis_name is None:
    group = ' per ghost batch' if layout.ghost else ''
    raise ValueError(
        f'batch norm in training got 1 value per feature{group} (x shape {tuple(x_shape)}): every value would '
        'normalize to 0 (output = bias, no gradient); use a batch of 2 or more, or training=False.')


def _unbiased(moments):
  """The moments with the unbiased variance `var * n / (n - 1)` (n the count; var as it is for n <= 1)."""
  return moments._replace(var=moments.var * moments.count / jnp.maximum(moments.count - 1, 1))


def _training_statistics(x, layout, mask, axis_name, axis_index_groups, unbiased=False):
  """The input in its view, its batch statistics, and the statistics to track.

  With `unbiased`, the tracked variance is the unbiased one (PyTorch's
  running variance): of the whole batch, or of each ghost group before the
  groups are pooled.

  Returns:
    `(xv, mask, batch, tracked)`: `xv` x in the compute dtype and
    `layout.view_shape`, `mask` in that view; `batch` the `Moments` to
    normalize with (broadcastable to `xv`); `tracked` the `Moments` the
    moving averages follow, as `[C]` vectors without gradient (moving
    statistics are not trained).
  """
  xv = x.astype(moments_lib.compute_dtype(x.dtype)).reshape(layout.view_shape)
  _check_more_than_one_value(x.shape, layout, mask, axis_name)
  mask = _mask_view(mask, layout, x.shape)
  if not layout.ghost:
    # Plain BN: the statistics of the whole (cross-device) batch.
    batch = moments_lib.batch_moments(xv, layout.reduce_axes, mask, axis_name, axis_index_groups)
    tracked = _unbiased(batch) if unbiased else batch
  else:
    # Ghost BN: each local group is normalized on its own (one group may be
    # the whole local batch: per-device BN); the moving statistics track the
    # pooled group statistics of every device.
    batch = moments_lib.batch_moments(xv, layout.reduce_axes, mask)
    tracked = moments_lib.pooled_moments(_unbiased(batch) if unbiased else batch, axis_name, axis_index_groups)
  num_features = max(layout.feature_shape)
  tracked = jax.lax.stop_gradient(moments_lib.Moments(*(jnp.reshape(a, (num_features,)) for a in tracked)))
  return xv, mask, batch, tracked


def _ema_weights(momentum, step, decay_product, debias):
  """Weights `(keep, take)` of old and new values, and the new decay product.

  A momentum outside [0, 1] (e.g. a schedule that overshoots) would make the variance negative: it is an
  error where its value is known (outside jit), and clipped to [0, 1] under jit.
  """
  if momentum is None:
    stepf = step.astype(jnp.float32)
    momentum_now = stepf / (stepf + 1.0)
  else:
    momentum_now = jnp.asarray(as_schedule(momentum)(step), jnp.float32)
    _check_momentum_range(momentum_now)
    momentum_now = jnp.clip(momentum_now, 0.0, 1.0)
  new_product = decay_product * momentum_now
  if debias:
    take = (1.0 - momentum_now) / jnp.maximum(1.0 - new_product, jnp.finfo(jnp.float32).tiny)
    keep = 1.0 - take
  else:
    keep, take = momentum_now, 1.0 - momentum_now
  return keep, take, new_product


def _check_momentum_range(momentum_now):
  if isinstance(momentum_now, jax.core.Tracer):
    return
  values = np.asarray(momentum_now)
  if np.any((values < 0) | (values > 1)) or not np.all(np.isfinite(values)):
    raise ValueError(f'momentum {values.tolist()} is outside [0, 1] (the weight of the old moving average); '
                     'check the momentum value or schedule.')


def _ema(old, new, keep, take, has_data):
  return jnp.where(has_data, keep * old + take * new, old)


def _affine_coefficients(params, shape, dtype, extra_scale=None, extra_shift=None):
  """`(multiplier, offset)` with multiplier = scale * extra_scale, offset = scale * extra_shift + bias.

  Parameters `[C]` are reshaped to `shape`; either result is None when it would be 1 or 0.
  """
  multiplier, offset = extra_scale, extra_shift
  scale = params.get('scale')
  if scale is not None:
    scale = scale.astype(dtype).reshape(shape)
    multiplier = scale if multiplier is None else multiplier * scale
    if offset is not None:
      offset = offset * scale
  bias = params.get('bias')
  if bias is not None:
    bias = bias.astype(dtype).reshape(shape)
    offset = bias if offset is None else offset + bias
  return multiplier, offset


def _normalize_with_moving_statistics(x, params, state, epsilon, layout):
  """Inference: normalize `x` with the state's moving statistics."""
  cdtype = moments_lib.compute_dtype(x.dtype)
  mean, var = moving_statistics(state, epsilon)
  coef = jax.lax.rsqrt(var.astype(cdtype) + epsilon).reshape(layout.feature_shape)
  multiplier, offset = _affine_coefficients(params, layout.feature_shape, cdtype)
  if multiplier is not None:
    coef = coef * multiplier
  y = (x.astype(cdtype) - mean.astype(cdtype).reshape(layout.feature_shape)) * coef
  if offset is not None:
    y = y + offset
  return y.astype(x.dtype)


def _check_common(fn, x, params, state, state_type, training, momentum, epsilon, axis, virtual_batch_size, mask):
  """`(x, layout)`: x as a real floating array (see `_real_float_input`), after checking every argument."""
  _check_training(fn, training)
  _check_range(fn, 'momentum', momentum, 0.0, 1.0, hint=_MOMENTUM_HINT)
  _check_range(fn, 'epsilon', epsilon, 0.0, np.inf, low_open=True)
  x = _real_float_input(fn, x)
  layout = _layout(fn, x, axis, virtual_batch_size, mask, training)
  _check_state_and_params(fn, params, state, state_type, x.shape, axis)
  return x, layout


def batch_norm(
    x: Array,
    params: Params,
    state: BatchNormState,
    *,
    training: bool,
    momentum: ScalarOrSchedule | None = 0.99,
    epsilon: float = 1e-3,
    axis: int = -1,
    virtual_batch_size: int | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    mask: Array | None = None,
    debias: bool = False,
    unbiased_moving_var: bool = False,
) -> tuple[Array, BatchNormState]:
  """Batch normalization (Ioffe & Szegedy 2015) with explicit moving statistics.

  Training: `y = scale * (x - mu_B) / sqrt(var_B + epsilon) + bias`, with
  mu_B and var_B the mean and biased variance of x over every axis but
  `axis`; the state's moving statistics are updated as
  `moving = momentum * moving + (1 - momentum) * batch` and `step` grows by 1.
  Inference (`training=False`): the moving statistics replace the batch
  statistics and the state is returned unchanged.

  Args:
    x: `[N, ..., C]` activations (`[N, C]` dense, `[N, H, W, C]` conv), any
      float dtype; statistics are computed in float32, `y` has x's dtype.
      Integers and bools are normalized as float32 (y is float32), float64
      is float32 unless `jax_enable_x64` is set; complex x raises a ValueError.
    params: from `batch_norm_init`: `scale` `[C]` and/or `bias` `[C]`.
    state: a `BatchNormState` from `batch_norm_init` or an earlier call.
    training: True to normalize with batch statistics and update the state.
    momentum: weight of the old moving average in [0, 1], or a schedule
      `step -> momentum` (see `bnjax.schedules`), or None for the cumulative
      average. Default 0.99 (Keras, Flax).
    epsilon: added to the variance, > 0. Default 1e-3 (Keras).
    axis: the feature axis (not 0, the batch axis).
    virtual_batch_size: ghost batch norm (Hoffer et al. 2017): the batch is
      split into consecutive groups of this many examples, each normalized
      with its own statistics; the moving statistics track the mean of the
      group statistics. Must divide N. None: one group (plain BN).
    axis_name: name of a mapped axis (shard_map, pmap, vmap) to compute the
      statistics over the whole global batch, each device weighted by its
      number of valid examples. With `virtual_batch_size`, groups stay local
      to each device and only the moving statistics are pooled over the axis.
    axis_index_groups: subgroups of `axis_name` (pmap only).
    mask: `[N]` booleans, or booleans broadcastable to x with the batch axis
      in full; False entries (padding) are left out of the statistics (they
      are still normalized). A batch with no valid entry leaves the moving
      statistics unchanged.
    debias: correct the moving averages for their initial value (see module doc).
    unbiased_moving_var: the moving variance averages the unbiased batch
      variance `var_B * n / (n - 1)` (n the entries per feature: of the
      global batch, or of each ghost group), as PyTorch's `running_var`
      does; the batch is still normalized with the biased var_B (as
      PyTorch does too). Default False (Keras, Flax: the biased variance).

  Returns:
    `(y, new_state)`, y with the shape of x and its dtype (float32 for
    integer or bool x); new_state with the dtypes of state.
  """
  fn = 'batch_norm'
  x, layout = _check_common(
      fn, x, params, state, BatchNormState, training, momentum, epsilon, axis, virtual_batch_size, mask
  )
  if not training:
    return _normalize_with_moving_statistics(x, params, state, epsilon, layout), state
  xv, mask, batch, tracked = _training_statistics(
      x, layout, mask, axis_name, axis_index_groups, unbiased=unbiased_moving_var
  )
  multiplier, offset = _affine_coefficients(params, layout.view_feature_shape, xv.dtype)
  y = normalize(
      xv, batch, multiplier, offset, mask,
      reduce_axes=layout.reduce_axes, epsilon=epsilon,
  )

  keep, take, decay_product = _ema_weights(momentum, state.step, state.decay_product, debias)
  has_data = tracked.count > 0
  new_state = BatchNormState(
      mean=_ema(state.mean, tracked.mean, keep, take, has_data),
      var=_ema(state.var, tracked.var, keep, take, has_data),
      step=state.step + 1,
      decay_product=jnp.where(jnp.any(has_data), decay_product, state.decay_product),
  )
  return y.reshape(x.shape).astype(x.dtype), new_state


def batch_renorm(
    x: Array,
    params: Params,
    state: BatchRenormState,
    *,
    training: bool,
    momentum: ScalarOrSchedule | None = 0.99,
    renorm_momentum: ScalarOrSchedule = 0.99,
    epsilon: float = 1e-3,
    rmax: ScalarOrSchedule = 3.0,
    dmax: ScalarOrSchedule = 5.0,
    axis: int = -1,
    virtual_batch_size: int | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    mask: Array | None = None,
    debias: bool = False,
) -> tuple[Array, BatchRenormState]:
  """Batch renormalization (Ioffe 2017, Algorithm 1).

  Training, with sigma_B = sqrt(var_B + epsilon) and the renorm moving
  averages mu = `state.renorm_mean`, sigma = `max(state.renorm_std, sqrt(epsilon))`:

      r = stop_gradient(clip(sigma_B / sigma, 1 / rmax, rmax))
      d = stop_gradient(clip((mu_B - mu) / sigma, -dmax, dmax))
      y = scale * ((x - mu_B) / sigma_B * r + d) + bias

  then mu and sigma are updated with `renorm_momentum`, and the inference
  statistics (`state.mean`, `state.std`) with `momentum`, all from mu_B and
  sigma_B. Inference (`training=False`) normalizes with `state.mean` and
  the variance `max(state.std**2 - epsilon, 0)`. This matches Keras 3's
  `BatchNormalization(renorm=True, renorm_clipping={'rmax': rmax,
  'rmin': 1 / rmax, 'dmax': dmax})` step for step. rmax = 1 and dmax = 0 is
  plain batch norm.

  Args:
    x, params, training, momentum, epsilon, axis, virtual_batch_size,
      axis_name, axis_index_groups, mask, debias: as in `batch_norm`
      (`debias` applies to the inference statistics).
    state: a `BatchRenormState` from `batch_renorm_init`.
    renorm_momentum: momentum of mu and sigma, a number in [0, 1] or a schedule.
    rmax: clipping of r to [1 / rmax, rmax]; >= 1, or a schedule (e.g.
      `bnjax.schedules.renorm_clipping_warmup`).
    dmax: clipping of d to [-dmax, dmax]; >= 0, or a schedule.

  Returns:
    `(y, new_state)`, as in `batch_norm` (y float32 for integer or bool x).
  """
  fn = 'batch_renorm'
  x, layout = _check_common(
      fn, x, params, state, BatchRenormState, training, momentum, epsilon, axis, virtual_batch_size, mask
  )
  _check_range(fn, 'renorm_momentum', renorm_momentum, 0.0, 1.0, hint=_MOMENTUM_HINT)
  _check_range(fn, 'rmax', rmax, 1.0, np.inf)
  _check_range(fn, 'dmax', dmax, 0.0, np.inf)
  if not training:
    return _normalize_with_moving_statistics(x, params, state, epsilon, layout), state
  xv, mask, batch, tracked = _training_statistics(x, layout, mask, axis_name, axis_index_groups)
  batch_std = jnp.sqrt(batch.var + epsilon)
  # The paper's sigma, kept away from 0 early in training (as Keras does).
  renorm_std = jnp.maximum(state.renorm_std, jnp.sqrt(epsilon)).reshape(layout.view_feature_shape)
  renorm_mean = state.renorm_mean.reshape(layout.view_feature_shape)
  rmax_now = jnp.asarray(as_schedule(rmax)(state.step), batch_std.dtype)
  dmax_now = jnp.asarray(as_schedule(dmax)(state.step), batch_std.dtype)
  r = jax.lax.stop_gradient(jnp.clip(batch_std / renorm_std, 1.0 / rmax_now, rmax_now))
  d = jax.lax.stop_gradient(jnp.clip((batch.mean - renorm_mean) / renorm_std, -dmax_now, dmax_now))
  multiplier, offset = _affine_coefficients(
      params, layout.view_feature_shape, xv.dtype, extra_scale=r, extra_shift=d
  )
  y = normalize(
      xv, batch, multiplier, offset, mask,
      reduce_axes=layout.reduce_axes, epsilon=epsilon,
  )

  tracked_std = jnp.sqrt(tracked.var + epsilon)
  has_data = tracked.count > 0
  keep, take, decay_product = _ema_weights(momentum, state.step, state.decay_product, debias)
  renorm_keep, renorm_take, _ = _ema_weights(renorm_momentum, state.step, state.decay_product, False)
  new_state = BatchRenormState(
      mean=_ema(state.mean, tracked.mean, keep, take, has_data),
      std=_ema(state.std, tracked_std, keep, take, has_data),
      renorm_mean=_ema(state.renorm_mean, tracked.mean, renorm_keep, renorm_take, has_data),
      renorm_std=_ema(state.renorm_std, tracked_std, renorm_keep, renorm_take, has_data),
      step=state.step + 1,
      decay_product=jnp.where(jnp.any(has_data), decay_product, state.decay_product),
  )
  return y.reshape(x.shape).astype(x.dtype), new_state


def moving_statistics(state: BatchNormState | BatchRenormState, epsilon: float = 1e-3) -> tuple[Array, Array]:
  """The `(mean [C], var [C])` that inference normalizes with, for either state type."""
  if isinstance(state, BatchRenormState):
    return state.mean, jnp.maximum(jnp.square(state.std) - epsilon, 0.0)
  return state.mean, state.var
