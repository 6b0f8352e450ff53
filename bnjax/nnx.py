"""Flax NNX modules around the pure functions of `bnjax.norm`.

    BatchNorm    -> bnjax.batch_norm     (plain and ghost BN)
    BatchRenorm  -> bnjax.batch_renorm   (batch renormalization)

`BatchNorm(num_features, *, rngs, ...)` takes every argument of
`flax.nnx.BatchNorm` with its meaning and default (`use_running_average=False`,
`axis=-1`, `momentum=0.99`, `epsilon=1e-5`, `dtype`, `param_dtype`,
`use_bias`, `use_scale`, `bias_init`, `scale_init`, `axis_name`,
`axis_index_groups`, `use_fast_variance`, `promote_dtype`,
`bias_metadata`, `scale_metadata`), and bnjax's options as keywords:
`momentum` may be a schedule `step -> momentum`, None (the cumulative
average) or an array (a data attribute, so `nnx.vmap` maps it),
`virtual_batch_size` (ghost BN), `debias`. The parameters are `nnx.Param`s
`scale` and `bias`; the statistics `nnx.BatchStat`s named as nnx's, `mean`
and `var` (renorm: `mean`, `std`, `renorm_mean`, `renorm_std`), plus `step`
only when a schedule (or None momentum) reads it and `decay_product` only
with `debias` (`bnjax.layers.stored_fields`). Every number comes from the
core through `bnjax.layers.apply`, as in `bnjax.linen`.

Train and eval as NNX does: `model.train()` / `model.eval()` set
`use_running_average` on every layer, `nnx.view(model,
use_running_average=True)` gives an evaluation view, and the call argument
`layer(x, use_running_average=True)` overrides the attribute.

    class MLP(nnx.Module):
      def __init__(self, rngs):
        self.linear = nnx.Linear(784, 100, rngs=rngs)
        self.norm = bnjax.nnx.BatchNorm(100, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(100, 10, rngs=rngs)
      def __call__(self, x):
        return self.head(nnx.relu(self.norm(self.linear(x))))

Model-level tools: `precise_statistics(model, batches)` writes the
population statistics of every bnjax norm layer (precise BN, Wu & Johnson
2021) into the model; `freeze(model)` makes its norm layers normalize with
their moving statistics and stop updating them, whatever `train()` says.
"""

from __future__ import annotations

import typing as tp
from types import MappingProxyType
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.nnx.nn import initializers

from bnjax import layers
from bnjax import precise
from bnjax.schedules import ScalarOrSchedule

Array = jax.Array


class Hyperparameter(nnx.Variable):
  """A hyperparameter given as an array (`momentum`, `renorm_momentum`, `rmax`, `dmax`), not trained.

  Kept as a Variable so that NNX's transforms map it like the statistics:
  an ensemble made under `nnx.vmap` with one momentum per member runs the
  members' momentums in one program.
  """


def _as_attribute(value):
  """Array hyperparameters as `Hyperparameter`s; numbers, None and schedules as they are (static)."""
  if isinstance(value, (jax.Array, np.ndarray)):
    return Hyperparameter(jnp.asarray(value))
  return value


def _value(attribute):
  return attribute[...] if isinstance(attribute, Hyperparameter) else attribute


class BatchNorm(nnx.Module):
  """Batch normalization (`bnjax.batch_norm`); ghost BN with `virtual_batch_size`.

  Call: `y = layer(x, use_running_average=None, *, mask=None)`, x `[N, ..., C]`.
  Training (`use_running_average` False) normalizes with the batch statistics
  and updates the `nnx.BatchStat`s in place; inference uses the moving
  statistics. A frozen layer (`freeze`) always does inference.

  Args (flax.nnx.BatchNorm's, with its defaults):
    num_features: C, the size of the feature axis.
    use_running_average: True for inference; the call argument overrides it.
    axis: the feature axis (not 0).
    momentum: weight of the old moving average: a number or array in [0, 1],
      a schedule `step -> momentum`, or None for the cumulative average.
    epsilon: added to the variance.
    dtype: dtype of the computation and the result; None: the promoted
      dtype of x, the statistics and the parameters (`promote_dtype`).
    param_dtype: dtype of `scale` and `bias`.
    use_bias, use_scale: learn `bias` (beta), `scale` (gamma).
    bias_init, scale_init: their initializers.
    axis_name: mapped axis for statistics over the global batch (each device
      weighted by its number of valid examples).
    axis_index_groups: subgroups of `axis_name` (pmap only).
    use_fast_variance: accepted for nnx's sake; the variance is always the
      exact two-pass one.
    promote_dtype: `(x, mean, var, scale, bias), dtype -> arrays`, nnx's hook;
      x is cast to the dtype of its first result.
    rngs: `nnx.Rngs` with a `params` stream.
    bias_metadata, scale_metadata: metadata of the `nnx.Param`s.
  bnjax's options:
    virtual_batch_size: ghost BN group size; must divide N. None: plain BN.
    debias: correct the moving averages for their initial value.
    unbiased_moving_var: the moving variance averages the unbiased batch
      variance, as PyTorch's running_var (`bnjax.torch_interop`). BatchNorm only.
  """

  _kind = layers.BATCH_NORM

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: bool | None = False,
      axis: int = -1,
      momentum: ScalarOrSchedule | None = 0.99,
      epsilon: float = 1e-5,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Callable = initializers.zeros_init(),
      scale_init: Callable = initializers.ones_init(),
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Callable = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: tp.Mapping[str, Any] = MappingProxyType({}),
      scale_metadata: tp.Mapping[str, Any] = MappingProxyType({}),
      virtual_batch_size: int | None = None,
      debias: bool = False,
      unbiased_moving_var: bool = False,
      **kind_options,
  ):
    feature_shape = (num_features,)
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = _as_attribute(momentum)
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.virtual_batch_size = virtual_batch_size
    self.debias = debias
    self.unbiased_moving_var = unbiased_moving_var
    self.frozen = False
    for name, value in kind_options.items():  # BatchRenorm's renorm_momentum, rmax, dmax
      setattr(self, name, _as_attribute(value))
    state_type = self._kind.state_type
    self._stored = layers.stored_fields(state_type, self._options())
    for field in self._stored:
      setattr(self, field, nnx.BatchStat(layers.start_value(state_type, field, feature_shape)))
    # As nnx.BatchNorm: scale first, then bias, each with a key of the params stream.
    self.scale = nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata) if use_scale \
        else nnx.data(None)
    self.bias = nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata) if use_bias \
        else nnx.data(None)

  def _options(self) -> dict:
    """The keyword arguments of the pure function that come from the attributes."""
    return dict(momentum=_value(self.momentum), epsilon=self.epsilon, virtual_batch_size=self.virtual_batch_size,
                debias=self.debias, unbiased_moving_var=self.unbiased_moving_var)

  def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
    """Normalizes x `[N, ..., C]`; `mask` `[N]` (or broadcastable to x) leaves entries out of the statistics."""
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(
          f'{type(self).__name__}: no use_running_average: give it to the constructor or the call, '
          'or use model.train() / model.eval() / nnx.view(model, use_running_average=...).'
      )
    training = not (use_running_average or self.frozen)
    params = {name: getattr(self, name)[...] for name in ('scale', 'bias') if getattr(self, name) is not None}
    stats = {field: getattr(self, field)[...] for field in self._stored}
    statistics = [stats[field] for field in self._kind.state_type._fields[:2]]
    x = self.promote_dtype((x, *statistics, params.get('scale'), params.get('bias')), dtype=self.dtype)[0]
    y, new_stats = layers.apply(
        self._kind, x, params, stats, training=training, axis=self.axis, options=self._options(), mask=mask,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
    )
    if training:
      for field, value in new_stats.items():
        getattr(self, field)[...] = value
      if getattr(self, 'record_moments', False):
        batch = layers.input_moments(x, self.axis, mask, self.axis_name, self.axis_index_groups)
        self.recorded_moments = nnx.data(layers.pool_moments(getattr(self, 'recorded_moments', None), batch))
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by `nnx.view`: sets `use_running_average` when given."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


class BatchRenorm(BatchNorm):
  """Batch renormalization (`bnjax.batch_renorm`, Ioffe 2017); ghost with `virtual_batch_size`.

  Arguments, besides those of `BatchNorm` (`momentum` updates the inference
  statistics `mean`/`std`):
    renorm_momentum: momentum of `renorm_mean`/`renorm_std`: a number, array
      or schedule. Default 0.99.
    rmax: r is clipped to [1 / rmax, rmax]; a number >= 1, array or schedule. Default 3.
    dmax: d is clipped to [-dmax, dmax]; a number >= 0, array or schedule. Default 5.
  """

  _kind = layers.BATCH_RENORM

  def __init__(self, num_features: int, *, renorm_momentum: ScalarOrSchedule = 0.99,
               rmax: ScalarOrSchedule = 3.0, dmax: ScalarOrSchedule = 5.0, rngs: nnx.Rngs, **options):
    super().__init__(num_features, rngs=rngs, renorm_momentum=renorm_momentum, rmax=rmax, dmax=dmax, **options)

  def _options(self) -> dict:
    return layers.renorm_options(super()._options(), renorm_momentum=_value(self.renorm_momentum),
                                 rmax=_value(self.rmax), dmax=_value(self.dmax))


def norm_layers(model: nnx.Module) -> list[tuple[tuple, BatchNorm]]:
  """`(path, layer)` of every bnjax norm layer (`BatchNorm`, `BatchRenorm`) in `model`, in graph order."""
  return [(path, module) for path, module in nnx.iter_modules(model) if isinstance(module, BatchNorm)]


def freeze(model: nnx.Module, frozen: bool = True) -> nnx.Module:
  """Freezes (or, with `frozen=False`, unfreezes) every bnjax norm layer of `model`, in place.

  A frozen layer normalizes with its moving statistics and leaves them as
  they are, in training calls too (`model.train()` does not unfreeze it);
  its `scale` and `bias` still train. Returns `model`.
  """
  for _, layer in norm_layers(model):
    layer.frozen = frozen
  return model


def precise_statistics(
    model: nnx.Module,
    batches: Any,
    *,
    forward: Callable[[nnx.Module, Any], Any] | None = None,
    num_examples: int | None = precise.DEFAULT_NUM_EXAMPLES,
) -> nnx.Module:
  """Precise BN for an NNX model: writes every bnjax norm layer's population statistics into it.

  Runs `forward(model, batch)` (default `model(batch)`) on each batch with
  the weights fixed and every bnjax norm layer in training mode (frozen
  ones too; other layers as they are: we recommend dropout off), pools the
  moments of each layer's input over the batches with
  `bnjax.precise.precise_statistics` (count-weighted, the variance of the
  batch means included), and writes them with
  `bnjax.precise.with_population_statistics`: `mean`/`var` for batch norm,
  `mean`/`std` (and the same `renorm_mean`/`renorm_std`) for batch renorm;
  `step`, `decay_product` and everything else in the model are kept.

      bnjax.nnx.precise_statistics(model, images)     # images [S, B, ...]

  Args:
    model: an NNX module with bnjax norm layers; updated in place.
    batches: stacked batches `[S, B, ...]` (or a tuple/dict of them) or an
      iterable of batches; see `bnjax.precise.precise_statistics`.
    forward: `(model, batch) -> anything`: how a batch runs through the
      model (pick the input out of a labelled batch here).
    num_examples: examples to pool, rounded up to whole batches; None: all.

  Returns:
    `model`.

  Raises:
    ValueError: the model has no bnjax norm layer; and the errors of
      `bnjax.precise.precise_statistics`.
  """
  if not norm_layers(model):
    raise ValueError('precise_statistics: the model has no bnjax.nnx BatchNorm or BatchRenorm layer.')
  forward = forward or (lambda model, batch: model(batch))
  graphdef, state = nnx.split(model)

  def batch_moments_fn(batch):
    copy = nnx.merge(graphdef, state, copy=True)  # fresh Variables, of this trace
    found = norm_layers(copy)
    for _, layer in found:
      layer.use_running_average, layer.frozen, layer.record_moments = False, False, True
    forward(copy, batch)
    return [(getattr(layer, 'recorded_moments', None), jnp.asarray(layer.epsilon, jnp.float32)) for _, layer in found]

  pooled = precise.precise_statistics(batch_moments_fn, batches, num_examples=num_examples)
  for (_, layer), (moments, epsilon) in zip(norm_layers(model), pooled):
    if moments is None:  # not called by forward
      continue
    stats = {field: getattr(layer, field)[...] for field in layer._stored}
    for field, value in precise.with_population_statistics(stats, moments, epsilon).items():
      getattr(layer, field)[...] = value
  return model
