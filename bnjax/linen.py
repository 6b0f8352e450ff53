"""Flax linen modules around the pure functions of `bnjax.norm`.

Two small modules, one per pure function (ghost batch norm is `BatchNorm`
with `virtual_batch_size`):

    BatchNorm    -> bnjax.batch_norm     (plain and ghost BN)
    BatchRenorm  -> bnjax.batch_renorm   (batch renormalization)

Both are drop-ins for `flax.linen.BatchNorm`: `scale` and `bias` live in
`params`, the moving statistics in the `batch_stats` collection,
`use_running_average` is an attribute or a call argument, and training code
passes the statistics in and takes the new ones out of `apply`:

    variables = model.init(key, x, use_running_average=False)
    y, updates = model.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
    variables = {**variables, **updates}        # nothing was mutated

`batch_stats` holds the core state's fields as plain arrays, so the
statistics are an ordinary pytree: `mean` and `var` where flax users look
for them (`BatchNorm`), `mean`, `std`, `renorm_mean`, `renorm_std`
(`BatchRenorm`), and the scalars `step` (the number of training updates, which
momentum/rmax/dmax schedules are called with) and `decay_product` (for
`debias`). `norm_state` turns one layer's statistics back into the core's
NamedTuple.

Differences from `flax.linen.BatchNorm`, all from the core: `center`/`scale`
instead of `use_bias`/`use_scale`; `epsilon` defaults to 1e-3 (Keras), not
1e-5; statistics are two-pass float32 and the output has x's dtype (no
`dtype`); only one feature axis.

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
with the collection `batch_moments` mutable, each layer also records the
moments of its input over the whole (global) batch; `precise_batch_stats`
pools them over many batches into population statistics:

    apply_fn = functools.partial(model.apply, train=True)   # called with mutable=[...]
    variables = {**variables, 'batch_stats': precise_batch_stats(apply_fn, variables, images)}
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax import moments as moments_lib
from bnjax import norm as norm_lib
from bnjax import precise
from bnjax.schedules import ScalarOrSchedule

Array = jnp.ndarray


def norm_state(stats: Mapping[str, Array]) -> norm_lib.BatchNormState | norm_lib.BatchRenormState:
  """One layer's `batch_stats` as the core state (`BatchRenormState` if it has `std`).

  E.g. `bnjax.moving_statistics(norm_state(variables['batch_stats']['norm_0']), epsilon)`.
  """
  state_type = norm_lib.BatchRenormState if 'std' in stats else norm_lib.BatchNormState
  missing = set(state_type._fields) - set(stats)
  if missing:
    raise ValueError(
        f'norm_state: the statistics have keys {sorted(stats)}, missing {sorted(missing)} of a '
        f'{state_type.__name__}; pass the batch_stats of one bnjax.linen layer.'
    )
  return state_type(**{field: stats[field] for field in state_type._fields})


def _apply_pure(
    module: nn.Module,
    x: Array,
    use_running_average: bool | None,
    mask: Array | None,
    init_fn: Callable,
    apply_fn: Callable,
    options: dict,
) -> Array:
  """Declares the module's variables from `init_fn`, runs `apply_fn`, stores its new state.

  While initializing, the state is not updated (as in `flax.linen.BatchNorm`)
  and `axis_name` is not used, so `init` runs outside the mapped axis.
  """
  use_running_average = nn.merge_param('use_running_average', module.use_running_average, use_running_average)
  name = type(module).__name__
  if not isinstance(module.axis, int) or not -x.ndim <= module.axis < x.ndim:
    raise ValueError(f'{name}: axis={module.axis!r} is not an axis of x with shape {x.shape}.')
  params0, state0 = init_fn(x.shape[module.axis], center=module.center, scale=module.scale, dtype=module.param_dtype)
  params = {key: module.param(key, lambda _, value=value: value) for key, value in params0.items()}
  stats = {
      field: module.variable('batch_stats', field, lambda value=value: value)
      for field, value in state0._asdict().items()
  }
  state = type(state0)(**{field: variable.value for field, variable in stats.items()})
  initializing = module.is_initializing()
  y, new_state = apply_fn(
      x, params, state,
      training=not use_running_average,
      axis=module.axis,
      mask=mask,
      axis_name=None if initializing else module.axis_name,
      axis_index_groups=None if initializing else module.axis_index_groups,
      **options,
  )
  if not use_running_average and not initializing:
    for field, variable in stats.items():
      variable.value = getattr(new_state, field)
    if module.is_mutable_collection(BATCH_MOMENTS):
      _record_batch_moments(module, x, mask)
  return y


BATCH_MOMENTS = 'batch_moments'


def _record_batch_moments(module: nn.Module, x: Array, mask: Array | None) -> None:
  """Stores the moments of x over its whole batch in the `batch_moments` collection, for precise BN.

  The layer's entry is `{mean [C], var [C], count [C], epsilon []}`: the mean
  and biased variance of x over every axis but the feature axis (ghost BN's
  groups included: the moments of the whole batch, not of each group),
  leaving out masked entries, over the global batch under `axis_name`, in
  float32 at least; `count` the number of entries per feature (masks may
  differ per feature), `epsilon` the layer's, which a renorm layer's
  population `std` needs. A layer called more than once in one `apply`
  pools its calls.
  """
  feature_axis = module.axis % x.ndim
  reduce_axes = tuple(a for a in range(x.ndim) if a != feature_axis)
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    if mask.ndim == 1:
      mask = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
  batch = moments_lib.batch_moments(
      x.astype(moments_lib.compute_dtype(x.dtype)), reduce_axes, mask, module.axis_name, module.axis_index_groups
  )
  batch = jax.lax.stop_gradient(moments_lib.Moments(*(jnp.reshape(a, (-1,)) for a in batch)))
  if module.has_variable(BATCH_MOMENTS, 'count'):
    earlier = moments_lib.Moments(*(module.get_variable(BATCH_MOMENTS, f) for f in moments_lib.Moments._fields))
    batch = precise.finalize(precise.update(precise.update(precise.init(batch), earlier), batch))
  for field, value in batch._asdict().items():
    module.put_variable(BATCH_MOMENTS, field, value)
  module.put_variable(BATCH_MOMENTS, 'epsilon', jnp.asarray(module.epsilon, jnp.float32))


class BatchNorm(nn.Module):
  """Batch normalization (`bnjax.batch_norm`); ghost BN with `virtual_batch_size`.

  Call: `y = BatchNorm(...)(x, use_running_average=None, *, mask=None)`, x
  `[N, ..., C]`, y of x's shape and dtype. Training (`use_running_average`
  False) normalizes with the batch statistics and, unless initializing,
  writes the new moving statistics to `batch_stats` (which must then be
  mutable); inference uses the moving statistics. A training call with the
  collection `batch_moments` mutable also records the moments of x over the
  whole batch there, for `precise_batch_stats` (nothing is computed when it
  is not mutable).

  Attributes:
    use_running_average: True for inference; or give it at call time.
    axis: the feature axis (C), not 0.
    momentum: weight of the old moving average, a number or array in [0, 1],
      a schedule `step -> momentum` (called with the stored `step`), or None
      for the cumulative average. Default 0.99.
    epsilon: added to the variance. Default 1e-3 (Keras; flax's is 1e-5).
    center: learn the shift `bias` (flax's `use_bias`).
    scale: learn the scale `scale` (flax's `use_scale`).
    param_dtype: dtype of `scale` and `bias`.
    virtual_batch_size: ghost BN: normalize consecutive groups of this many
      examples separately; must divide N. None: plain BN.
    axis_name: mapped axis (shard_map, pmap, vmap) to compute statistics
      over the global batch.
    axis_index_groups: subgroups of `axis_name` (pmap only).
    debias: correct the moving averages for their initial value.
  """

  use_running_average: bool | None = None
  axis: int = -1
  momentum: ScalarOrSchedule | None = 0.99
  epsilon: float = 1e-3
  center: bool = True
  scale: bool = True
  param_dtype: Any = jnp.float32
  virtual_batch_size: int | None = None
  axis_name: Any = None
  axis_index_groups: Any = None
  debias: bool = False

  # The pure functions this module wraps (a class attribute, not a field).
  _pure_functions = (norm_lib.batch_norm_init, norm_lib.batch_norm)

  def _options(self) -> dict:
    """The keyword arguments of the pure function that come from the attributes."""
    return dict(
        momentum=self.momentum,
        epsilon=self.epsilon,
        virtual_batch_size=self.virtual_batch_size,
        debias=self.debias,
    )

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
    """Normalizes x `[N, ..., C]`; `mask` `[N]` (or broadcastable to x) leaves entries out of the statistics."""
    init_fn, apply_fn = self._pure_functions
    return _apply_pure(self, x, use_running_average, mask, init_fn, apply_fn, self._options())


class BatchRenorm(BatchNorm):
  """Batch renormalization (`bnjax.batch_renorm`, Ioffe 2017); ghost with `virtual_batch_size`.

  Attributes, besides those of `BatchNorm` (`momentum` updates the inference
  statistics `mean`/`std`):
    renorm_momentum: momentum of the renorm statistics `renorm_mean` and
      `renorm_std`, a number, array or schedule. Default 0.99.
    rmax: r is clipped to [1 / rmax, rmax]; a number >= 1, array or schedule
      (`bnjax.renorm_clipping_warmup()` gives the paper's pair). Default 3.
    dmax: d is clipped to [-dmax, dmax]; a number >= 0, array or schedule. Default 5.
  """

  renorm_momentum: ScalarOrSchedule = 0.99
  rmax: ScalarOrSchedule = 3.0
  dmax: ScalarOrSchedule = 5.0

  _pure_functions = (norm_lib.batch_renorm_init, norm_lib.batch_renorm)

  def _options(self) -> dict:
    return dict(super()._options(), renorm_momentum=self.renorm_momentum, rmax=self.rmax, dmax=self.dmax)


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
