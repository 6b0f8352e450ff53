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
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp

from bnjax import norm as norm_lib
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
  return y


class BatchNorm(nn.Module):
  """Batch normalization (`bnjax.batch_norm`); ghost BN with `virtual_batch_size`.

  Call: `y = BatchNorm(...)(x, use_running_average=None, *, mask=None)`, x
  `[N, ..., C]`, y of x's shape and dtype. Training (`use_running_average`
  False) normalizes with the batch statistics and, unless initializing,
  writes the new moving statistics to `batch_stats` (which must then be
  mutable); inference uses the moving statistics.

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
