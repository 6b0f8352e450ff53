"""Flax linen modules around the pure functions of `bnjax.norm`.

Two small modules, one per pure function (ghost batch norm is `BatchNorm`
with `virtual_batch_size`):

    BatchNorm    -> bnjax.batch_norm     (plain and ghost BN)
    BatchRenorm  -> bnjax.batch_renorm   (batch renormalization)

`BatchNorm` is a drop-in for `flax.linen.BatchNorm`: it takes every
argument flax's takes, with the same names, meanings and defaults
(`use_running_average`, `axis` (an int or a tuple), `momentum=0.99`,
`epsilon=1e-5`, `dtype`, `param_dtype`, `use_bias`, `use_scale`,
`bias_init`, `scale_init`, `axis_name`, `axis_index_groups`,
`use_fast_variance`, `force_float32_reductions`; call `(x,
use_running_average=None, *, mask=None)`). `scale` and `bias` live in
`params`, the moving statistics `mean` and `var` in `batch_stats`, and
training code passes the statistics in and takes the new ones out of `apply`:

    variables = model.init(key, x, use_running_average=False)
    y, updates = model.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
    variables = {**variables, **updates}        # nothing was mutated

bnjax's own options are extra keyword fields: `momentum` may also be a
schedule `step -> momentum` or None (the cumulative average),
`virtual_batch_size` (ghost BN), `debias`. `batch_stats` holds what the
options need and no more (`bnjax.layers.stored_fields`): `mean` and `var`
as flax's, plus `step` (the number of training updates, which schedules are
called with) only with a schedule or None momentum, and `decay_product` only
with `debias`. So a checkpoint written with `flax.linen.BatchNorm` loads as
it is, and a `jax.lax.pmean` over `batch_stats` keeps every dtype.
`norm_state` turns one layer's statistics back into the core's NamedTuple.

Where the numbers differ from flax's (by rounding only): the variance is
the exact two-pass one (`use_fast_variance` is accepted; bnjax's two-pass
variance is as fast, and never cancels), and statistics are reduced in
float32 at least (`force_float32_reductions=False` only keeps the stored
statistics in `param_dtype`, as flax does). Cross-device statistics
(`axis_name`) weight each device by its number of valid examples, where
flax averages the device means (the same numbers without masks).

Hyperparameter values (`momentum`, `renorm_momentum`, `rmax`, `dmax`) are
plain dataclass fields that take a number, a JAX array, or a schedule
`step -> value`. A module built inside a transformed function may hold traced
values, which is how one program runs K momentums under `jax.vmap`:

    def run(momentum, variables):
      return BatchNorm(momentum=momentum).apply(variables, x, use_running_average=False,
                                                mutable=['batch_stats'])
    jax.vmap(run)(jnp.array([0.9, 0.99]), stacked_variables)

(`bnjax.lab.models` builds its norm layers this way from an `hparams` argument.)

Precise BN (`bnjax.precise`, Wu & Johnson 2021): in a training-mode call
that names the collection `batch_moments` in `mutable` (a list or a string:
`mutable=True` does not ask for it), each layer also records the moments of
its input over the whole (global) batch; `precise_batch_stats` pools them
over many batches into population statistics:

    apply_fn = functools.partial(model.apply, train=True)   # called with mutable=[...]
    variables = {**variables, 'batch_stats': precise_batch_stats(apply_fn, variables, images)}
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp

from bnjax import layers
from bnjax import moments as moments_lib
from bnjax import norm as norm_lib
from bnjax import precise
from bnjax.schedules import ScalarOrSchedule

Array = jnp.ndarray
Initializer = Callable[..., Array]


def norm_state(stats: Mapping[str, Array]) -> norm_lib.BatchNormState | norm_lib.BatchRenormState:
  """One layer's `batch_stats` as the core state (`BatchRenormState` if it has `std`).

  A missing `step` or `decay_product` (not stored by a layer whose options
  do not read it, nor by flax's BatchNorm) is at its start value, 0 or 1.
  E.g. `bnjax.moving_statistics(norm_state(variables['batch_stats']['norm_0']), epsilon)`.
  """
  state_type = norm_lib.BatchRenormState if 'std' in stats else norm_lib.BatchNormState
  try:
    return layers.as_state(state_type, stats)
  except ValueError as error:
    raise ValueError(f'norm_state: {error}') from None


BATCH_MOMENTS = 'batch_moments'


def _asks_for(module: nn.Module, collection: str) -> bool:
  """Whether `apply` named `collection` in `mutable` (a string or a list; `mutable=True` does not name it)."""
  mutable = module.scope.mutable
  if isinstance(mutable, str):
    return mutable == collection
  return isinstance(mutable, (list, tuple, set, frozenset)) and collection in mutable


def _record_batch_moments(module: nn.Module, x: Array, mask: Array | None) -> None:
  """Stores the moments of x over its whole batch in the `batch_moments` collection, for precise BN.

  The layer's entry is `{mean [C], var [C], count [C], epsilon []}`: the
  moments of `bnjax.layers.input_moments`, and the layer's `epsilon`, which a
  renorm layer's population `std` needs. A layer called more than once in
  one `apply` pools its calls.
  """
  batch = layers.input_moments(x, module.axis, mask, module.axis_name, module.axis_index_groups)
  earlier = None
  if module.has_variable(BATCH_MOMENTS, 'count'):
    earlier = moments_lib.Moments(*(module.get_variable(BATCH_MOMENTS, f) for f in moments_lib.Moments._fields))
  for field, value in layers.pool_moments(earlier, batch)._asdict().items():
    module.put_variable(BATCH_MOMENTS, field, value)
  module.put_variable(BATCH_MOMENTS, 'epsilon', jnp.asarray(module.epsilon, jnp.float32))


class BatchNorm(nn.Module):
  """Batch normalization (`bnjax.batch_norm`); ghost BN with `virtual_batch_size`.

  Call: `y = BatchNorm(...)(x, use_running_average=None, *, mask=None)`, x
  `[N, ..., C]`, y of x's shape. Training (`use_running_average` False)
  normalizes with the batch statistics and, unless initializing, writes the
  new moving statistics to `batch_stats` (which must then be mutable);
  inference uses the moving statistics. A training call that names the
  collection `batch_moments` in `mutable` also records the moments of x over
  the whole batch there, for `precise_batch_stats`.

  Attributes (flax.linen.BatchNorm's, with its defaults):
    use_running_average: True for inference; or give it at call time.
    axis: the feature axis (C), or a tuple of them; not 0.
    momentum: weight of the old moving average, a number or array in [0, 1],
      a schedule `step -> momentum` (called with the stored `step`), or None
      for the cumulative average. Default 0.99.
    epsilon: added to the variance. Default 1e-5 (flax; Keras and the lab use 1e-3).
    dtype: the dtype of y; None: the result type of x and the parameters
      (flax's rule: float32 for bfloat16 x with float32 parameters).
    param_dtype: dtype of `scale` and `bias`.
    use_bias: learn the shift `bias` (beta).
    use_scale: learn the scale `scale` (gamma).
    bias_init: initializer of `bias` (zeros).
    scale_init: initializer of `scale` (ones).
    axis_name: mapped axis (shard_map, pmap, vmap) to compute statistics
      over the global batch, each device weighted by its valid examples.
    axis_index_groups: subgroups of `axis_name` (pmap only).
    use_fast_variance: accepted for flax's sake; bnjax always computes the
      exact two-pass variance.
    force_float32_reductions: True stores the statistics in float32; False
      in `param_dtype` (as flax). Reductions are float32 at least either way.
  bnjax's options:
    virtual_batch_size: ghost BN: normalize consecutive groups of this many
      examples separately; must divide N. None: plain BN.
    debias: correct the moving averages for their initial value.
    unbiased_moving_var: the moving variance averages the unbiased batch
      variance, as PyTorch's running_var (`bnjax.torch_interop`). BatchNorm only.
  """

  use_running_average: bool | None = None
  axis: int | tuple = -1
  momentum: ScalarOrSchedule | None = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  virtual_batch_size: int | None = None
  debias: bool = False
  unbiased_moving_var: bool = False

  # The core function this module wraps (a class attribute, not a field).
  _kind = layers.BATCH_NORM

  def _options(self) -> dict:
    """The keyword arguments of the pure function that come from the attributes."""
    return dict(
        momentum=self.momentum,
        epsilon=self.epsilon,
        virtual_batch_size=self.virtual_batch_size,
        debias=self.debias,
        unbiased_moving_var=self.unbiased_moving_var,
    )

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
    """Normalizes x `[N, ..., C]`; `mask` `[N]` (or broadcastable to x) leaves entries out of the statistics."""
    use_running_average = nn.merge_param('use_running_average', self.use_running_average, use_running_average)
    name = type(self).__name__
    try:
      axes = layers.feature_axes(jnp.ndim(x), self.axis)
    except ValueError as error:
      raise ValueError(f'{name}: {error}') from None
    feature_shape = tuple(jnp.shape(x)[a] for a in axes)
    options = self._options()
    stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    state_type = self._kind.state_type
    stats = {}
    for field in layers.stored_fields(state_type, options):
      # Scalars a checkpoint lacks (flax's has mean and var only) read as their start values.
      if field in layers.SCALAR_FIELDS and not (
          self.has_variable('batch_stats', field) or self.is_mutable_collection('batch_stats')
      ):
        continue
      stats[field] = self.variable(
          'batch_stats', field, lambda f=field: layers.start_value(state_type, f, feature_shape, stats_dtype)
      )
    params = {}
    if self.use_scale:
      params['scale'] = self.param('scale', self.scale_init, feature_shape, self.param_dtype)
    if self.use_bias:
      params['bias'] = self.param('bias', self.bias_init, feature_shape, self.param_dtype)
    out_dtype = layers.output_dtype(self.dtype, x, *params.values())
    x = jnp.asarray(x)
    initializing = self.is_initializing()
    y, new_stats = layers.apply(
        self._kind,
        x.astype(jnp.promote_types(x.dtype, out_dtype)),
        params,
        {field: variable.value for field, variable in stats.items()},
        training=not use_running_average,
        axis=axes,
        options=options,
        mask=mask,
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
    )
    if not use_running_average and not initializing:
      for field, variable in stats.items():
        variable.value = new_stats[field]
      if _asks_for(self, BATCH_MOMENTS):
        _record_batch_moments(self, x, mask)
    return y.astype(out_dtype)


class BatchRenorm(BatchNorm):
  """Batch renormalization (`bnjax.batch_renorm`, Ioffe 2017); ghost with `virtual_batch_size`.

  Attributes, besides those of `BatchNorm` (`momentum` updates the inference
  statistics `mean`/`std`; `batch_stats` has `mean`, `std`, `renorm_mean`,
  `renorm_std`):
    renorm_momentum: momentum of the renorm statistics `renorm_mean` and
      `renorm_std`, a number, array or schedule. Default 0.99.
    rmax: r is clipped to [1 / rmax, rmax]; a number >= 1, array or schedule
      (`bnjax.renorm_clipping_warmup()` gives the paper's pair). Default 3.
    dmax: d is clipped to [-dmax, dmax]; a number >= 0, array or schedule. Default 5.
  """

  renorm_momentum: ScalarOrSchedule = 0.99
  rmax: ScalarOrSchedule = 3.0
  dmax: ScalarOrSchedule = 5.0

  _kind = layers.BATCH_RENORM

  def _options(self) -> dict:
    return layers.renorm_options(super()._options(), renorm_momentum=self.renorm_momentum, rmax=self.rmax,
                                 dmax=self.dmax)


def _pooled_layers(recorded: Mapping[str, Any]) -> Any:
  """The `batch_moments` collection with each layer's entry as `(Moments, epsilon)`."""
  if 'count' in recorded and not isinstance(recorded['count'], Mapping):
    return (moments_lib.Moments(recorded['mean'], recorded['var'], recorded['count']), recorded['epsilon'])
  return {name: _pooled_layers(child) for name, child in recorded.items()}


def _with_population(stats: Mapping[str, Any], pooled: Any) -> Any:
  """`stats` (a `batch_stats` subtree) with every layer found in `pooled` given its population statistics."""
  if pooled is None:
    return stats
  if isinstance(pooled, tuple):
    moments, epsilon = pooled
    return precise.with_population_statistics(stats, moments, epsilon)
  return {name: _with_population(child, pooled.get(name)) for name, child in stats.items()}


def precise_batch_stats(
    apply_fn: Callable[..., tuple[Any, Mapping[str, Any]]],
    variables: Mapping[str, Any],
    batches: Any,
    *,
    num_examples: int | None = precise.DEFAULT_NUM_EXAMPLES,
) -> dict:
  """Precise BN for a Flax model: `batch_stats` with every layer's population statistics.

  Runs a training-mode forward pass of each batch under the fixed
  `variables` (as fvcore's `update_bn_stats`), pools the moments each
  `BatchNorm`/`BatchRenorm` layer records of its input with
  `bnjax.precise.precise_statistics` (count-weighted mean and biased
  variance over all examples, the variance of the batch means included; see
  `bnjax.precise`), and writes them with
  `bnjax.precise.with_population_statistics`: `mean`/`var` for batch norm,
  `mean`/`std` = `sqrt(var + epsilon)` (the layer's epsilon) and the same
  `renorm_mean`/`renorm_std` for batch renorm; `step` and `decay_product`
  are kept. Ghost BN layers get the statistics of all examples too, not the
  average of their group statistics that their moving averages track (which
  misses the variance of the group means).

      apply_fn = functools.partial(model.apply, train=True)
      batch_stats = precise_batch_stats(apply_fn, variables, images)  # images [S, B, H, W, C]
      variables = {**variables, 'batch_stats': batch_stats}

  The moving statistics given in are not used by a training-mode pass,
  except by renorm layers, whose r and d come from `renorm_mean` and
  `renorm_std` (so they shape the inputs of the layers after them). The
  new statistics each layer computes during the passes are thrown away.

  Args:
    apply_fn: `apply_fn(variables, batch, mutable=collections) -> (output,
      updated_collections)`, as `model.apply`: it must run the model in
      training mode (batch statistics) and pass `mutable` on to `apply`;
      `functools.partial(model.apply, train=True)` for a model called as
      `model(x, train)` with `batch` the input. Pick the input out of a
      batch, pass `rngs`, etc. in it: e.g. `lambda v, batch, mutable:
      model.apply(v, batch[0], train=True, mutable=mutable)`. We recommend
      a pass with dropout off, so that the statistics are those of the
      inputs each layer sees at inference (if dropout runs, give it its
      `rngs`). It is traced once and jitted.
    variables: the model's variables with `batch_stats` (and `params`).
    batches: stacked batches `[S, B, ...]` (or a tuple/dict of them), run as
      one jitted scan, or an iterable of batches; see
      `bnjax.precise.precise_statistics`.
    num_examples: how many examples to pool, rounded up to whole batches;
      None for all. Default 10^4 (Wu & Johnson 2021).

  Returns:
    A new `batch_stats` collection with the structure of
    `variables['batch_stats']`. Layers that record no moments (bnjax layers
    in inference mode, `flax.linen.BatchNorm`) keep their statistics.

  Raises:
    ValueError: no `batch_stats` in `variables`, or no layer recorded moments
      (`apply_fn` did not run bnjax layers in training mode or dropped
      `mutable`); and the errors of `precise_statistics`.
  """
  if 'batch_stats' not in variables:
    raise ValueError(
        f'precise_batch_stats: variables have collections {sorted(variables)}, no batch_stats; '
        'pass the variables of a model with bnjax.linen norm layers.'
    )
  # Moments left in the variables by an earlier call would be pooled with this pass's.
  variables = {name: collection for name, collection in variables.items() if name != BATCH_MOMENTS}

  def batch_moments_fn(batch):
    _, collections = apply_fn(variables, batch, mutable=['batch_stats', BATCH_MOMENTS])
    recorded = collections.get(BATCH_MOMENTS) if isinstance(collections, Mapping) else None
    if not recorded:
      raise ValueError(
          'precise_batch_stats: no layer recorded batch moments: apply_fn must run the model in '
          'training mode (batch statistics) and pass mutable= on to apply, e.g. '
          'functools.partial(model.apply, train=True).'
      )
    return _pooled_layers(recorded)

  pooled = precise.precise_statistics(batch_moments_fn, batches, num_examples=num_examples)
  return _with_population(variables['batch_stats'], pooled)
