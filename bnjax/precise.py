"""Precise batch-norm statistics: the population statistics of every BN layer under fixed weights.

The moving averages of batch norm follow the weights of many past steps, so
at the end of training they lag the final weights (and with a small momentum
they are noisy). Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm"; fvcore's `update_bn_stats`, PyTorch's `swa_utils.update_bn`)
fixes the weights, runs training-mode forward passes over many batches and
replaces each layer's moving statistics by the statistics of its input over
all of them: the population statistics that inference should use. Wu &
Johnson find 10^4 examples enough (the default here).

Pooling. Batch k gives each layer its batch `Moments`: n_k entries per
feature (count), mean m_k and biased variance v_k. Over K batches,

    n    = sum_k n_k
    mean = sum_k n_k m_k / n
    var  = sum_k n_k (v_k + (m_k - mean)**2) / n

the mean and biased variance of the concatenated batches: the mean of the
batch variances plus the variance of the batch means, each batch weighted by
its count (so a short last batch or masked examples count exactly). The sums
are taken pairwise (Chan, Golub & LeVeque 1979), never as sums of squares, in
float32 at least, with the means taken relative to the first batch's: inputs
with a large mean (1e4 + N(0, 1)) keep their variance.

Compared with PyTorch `update_bn` (and fvcore `update_bn_stats`), which take
the cumulative average of the layer's batch statistics: their mean, the
average of the batch means, equals ours when the batches have equal sizes;
their variance is the average of the *unbiased* batch variances,
`(1 / K) sum_k v_k n_k / (n_k - 1)`, without the variance of the batch means.
Ours is the biased variance of the whole population, which inference
normalizes with. (The moving variance of `bnjax.batch_norm` averages the
biased batch variances: it too misses the variance of the batch means.)

The pieces:
- `init`, `update`, `finalize`: the accumulator as pure functions over a
  `PreciseState` (fixed shapes: works under `jit` and `lax.scan`).
- `precise_statistics`: runs a function `batch -> moments` over stacked
  batches (one jitted `lax.scan`) or an iterable of batches, and pools.
- `with_population_statistics`: writes pooled moments into a layer's state
  (`BatchNormState`, `BatchRenormState` or their `batch_stats` dicts).

`bnjax.linen.precise_batch_stats` does all of it for a Flax model.

The procedure is that of fvcore and Wu & Johnson: training-mode forward
passes (batch statistics) with the weights fixed. Whether dropout runs is the
caller's choice; we recommend the passes run with dropout off, so that each
layer sees the inputs it sees at inference.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax.moments import Moments, compute_dtype
from bnjax.norm import BatchNormState, BatchRenormState

Array = jnp.ndarray

DEFAULT_NUM_EXAMPLES = 10_000


class Pooled(NamedTuple):
  """One layer's pooled statistics so far, its mean kept as `shift + offset`.

  The shift is the first batch's mean, so the offsets that are updated stay
  small and keep their digits when the mean is large (1e4 + N(0, 1)).

  Attributes:
    shift: the mean of the first batch with data (per feature).
    offset: the pooled mean minus `shift`.
    var: the pooled biased variance.
    count: the number of entries pooled (0 before the first).
  """

  shift: Array
  offset: Array
  var: Array
  count: Array


class PreciseState(NamedTuple):
  """The pooled statistics of the batches seen so far.

  Attributes:
    pooled: a pytree with the structure of the moments given to `init`, each
      `Moments` leaf a `Pooled` of arrays with the mean's shape, in float32 at
      least (the count too: it is broadcast to the mean's shape). A leaf that
      is not a `Moments` holds its value in the latest batch.
  """

  pooled: Any


def _is_moments(node) -> bool:
  return isinstance(node, Moments)


def _empty(template):
  """Zero statistics (count 0) shaped like `template` (a `Moments`, array or ShapeDtypeStruct leaf)."""
  if not _is_moments(template):
    return jnp.zeros(np.shape(template), template.dtype)
  dtype = compute_dtype(template.mean.dtype)
  zeros = lambda: jnp.zeros(np.shape(template.mean), dtype)
  return Pooled(shift=zeros(), offset=zeros(), var=zeros(), count=zeros())


def init(moments: Any) -> PreciseState:
  """An empty accumulator for moments shaped like `moments`.

  Args:
    moments: a pytree of `Moments` (one per BN layer), e.g. the output of the
      function whose batches will be pooled, or its `jax.eval_shape`. Only
      the shapes and dtypes are used. Leaves that are not `Moments` (such as
      a layer's epsilon) are carried: the state keeps their latest value.

  Returns:
    A `PreciseState` with count 0 (and mean, var 0) for every `Moments` leaf.
  """
  return PreciseState(jax.tree.map(_empty, moments, is_leaf=_is_moments))


def _pool(pooled, batch):
  """Chan's pairwise update of one leaf: the moments of the union of two sets of entries."""
  if not isinstance(pooled, Pooled):
    return jnp.asarray(batch, pooled.dtype)
  dtype = pooled.var.dtype
  mean, var = (jnp.asarray(a, dtype) for a in (batch.mean, batch.var))
  count = jnp.broadcast_to(jnp.asarray(batch.count, dtype), mean.shape)
  shift = jnp.where(pooled.count > 0, pooled.shift, mean)
  total = pooled.count + count
  weight = count / jnp.maximum(total, 1)  # the batch's share (counts are whole numbers)
  delta = (mean - shift) - pooled.offset
  return Pooled(
      shift=shift,
      offset=pooled.offset + weight * delta,
      var=pooled.var + weight * (var - pooled.var) + weight * (1 - weight) * delta * delta,
      count=total,
  )


def update(state: PreciseState, moments: Any) -> PreciseState:
  """Pools one more batch into the state.

  Args:
    state: from `init` or an earlier `update`.
    moments: the batch's pytree of `Moments`, with the structure and shapes
      given to `init`. A batch (or feature) with count 0 changes nothing.

  Returns:
    The state of the batches so far and this one: per `Moments` leaf, with
    w = n_batch / (n_so_far + n_batch) and delta = m_batch - m_so_far,
    `mean += w * delta`, `var += w * (v_batch - var) + w * (1 - w) * delta**2`,
    `count += n_batch`.
  """
  is_leaf = lambda node: isinstance(node, Pooled)
  return PreciseState(jax.tree.map(_pool, state.pooled, moments, is_leaf=is_leaf))


def _moments(pooled):
  if not isinstance(pooled, Pooled):
    return pooled
  return Moments(mean=pooled.shift + pooled.offset, var=pooled.var, count=pooled.count)


def finalize(state: PreciseState) -> Any:
  """The pooled moments: per `Moments` leaf the mean, biased variance and count of all entries seen."""
  return jax.tree.map(_moments, state.pooled, is_leaf=lambda node: isinstance(node, Pooled))


# ----------------------------------------------------------------------------
# Running a model's training-mode forward pass over batches.


def _check_num_examples(num_examples):
  if num_examples is None:
    return
  if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
    raise ValueError(
        f'precise_statistics: num_examples={num_examples!r} must be a positive int '
        '(how many examples to pool; 10_000 is Wu & Johnson\'s choice) or None (every batch).'
    )


def _is_stacked(batches) -> bool:
  """Whether `batches` is an array `[S, B, ...]` or a tuple/dict of such arrays (not an iterable of batches)."""
  if isinstance(batches, (jax.Array, np.ndarray)):
    return True
  if not isinstance(batches, (tuple, Mapping)):
    return False
  leaves = jax.tree.leaves(batches)
  if not leaves or not all(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves):
    raise ValueError(
        'precise_statistics: a tuple or dict of batches is read as stacked arrays [S, B, ...] '
        f'(e.g. (images, labels)), but it holds {[type(leaf).__name__ for leaf in leaves]}; '
        'pass stacked arrays, or a list or iterator of batches.'
    )
  return True


def _pool_stacked(batch_moments_fn, batches, num_examples):
  shapes = [np.shape(leaf) for leaf in jax.tree.leaves(batches)]
  if any(len(shape) < 2 or shape[:2] != shapes[0][:2] for shape in shapes):
    raise ValueError(
        f'precise_statistics: stacked batches must be arrays [S, B, ...] with the same S and B; '
        f'got shapes {shapes}.'
    )
  num_batches, batch_size = shapes[0][:2]
  if num_batches == 0 or batch_size == 0:
    raise ValueError(f'precise_statistics: no batches to pool (stacked shape {shapes[0]}).')
  if num_examples is not None:
    num_batches = min(num_batches, math.ceil(num_examples / batch_size))
  batches = jax.tree.map(lambda a: a[:num_batches], batches)
  one_batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), batches)
  empty = init(jax.eval_shape(batch_moments_fn, one_batch))

  @jax.jit
  def pool_all(state, batches):
    step = lambda state, batch: (update(state, batch_moments_fn(batch)), None)
    return jax.lax.scan(step, state, batches)[0]

  return finalize(pool_all(empty, batches))


def _batch_size(batch) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves or np.ndim(leaves[0]) < 1:
    raise ValueError(
        f'precise_statistics: a batch must be an array [B, ...] or a pytree of them; got {type(batch).__name__}.'
    )
  return np.shape(leaves[0])[0]


def _pool_iterable(batch_moments_fn, batches, num_examples):
  step = jax.jit(lambda state, batch: update(state, batch_moments_fn(batch)))
  state, seen = None, 0
  for batch in batches:
    if state is None:
      state = init(jax.eval_shape(batch_moments_fn, batch))
    state = step(state, batch)
    seen += _batch_size(batch)
    if num_examples is not None and seen >= num_examples:
      break  # an iterator is not read further
  if state is None:
    raise ValueError('precise_statistics: no batches to pool (the iterable was empty).')
  return finalize(state)


def precise_statistics(
    batch_moments_fn: Callable[[Any], Any],
    batches: Any | Iterable[Any],
    *,
    num_examples: int | None = DEFAULT_NUM_EXAMPLES,
) -> Any:
  """The population statistics of every BN layer: batch moments pooled over batches.

  Args:
    batch_moments_fn: `batch -> pytree of Moments`, one per BN layer: the
      batch statistics of each layer's input in a training-mode forward pass
      of `batch` under fixed weights (e.g. what `bnjax.moments.batch_moments`
      gives; any shapes, the pooled moments keep them). It must be a pure
      function of its batch (it is jitted). Leaves that are not `Moments`
      are returned as they are in the last batch used.
    batches: either stacked, an array `[S, B, ...]` or a tuple/dict of such
      arrays with the same S and B (e.g. `(images, labels)`), run as one
      jitted `lax.scan` over the S batches; or any other iterable (a list,
      a generator, a data loader) of batches `[B, ...]` (or pytrees of
      them), each pooled by the same jitted step (batches of a new shape
      compile it again). A tuple is always read as stacked arrays; pass a
      list of batches as a list.
    num_examples: stop once this many examples (entries of the batch axis)
      were pooled, rounded up to whole batches: the first
      `ceil(num_examples / B)` batches. An iterator is not read beyond the
      batch that reaches it. None: every batch. Default 10^4 (Wu & Johnson
      2021).

  Returns:
    The pooled pytree of `Moments` (see the module doc): per layer, the mean
    and biased variance of its input over all the batches used, and the
    count of entries they are over.

  Raises:
    ValueError: no batches, `num_examples` not a positive int, or stacked
      arrays of unequal S or B.
  """
  _check_num_examples(num_examples)
  if _is_stacked(batches):
    return _pool_stacked(batch_moments_fn, batches, num_examples)
  return _pool_iterable(batch_moments_fn, batches, num_examples)


# ----------------------------------------------------------------------------
# Writing the population statistics into a layer's state.


def _as_moments(moments) -> Moments:
  if isinstance(moments, Mapping):
    return Moments(**{field: moments[field] for field in Moments._fields})
  return moments


def _population_fields(renorm: bool, old: Mapping[str, Array], moments: Moments, epsilon) -> dict:
  """The new values of the state's statistics fields; features with count 0 keep the old ones."""
  shape = np.shape(old['mean'])
  if np.size(moments.mean) != math.prod(shape):
    raise ValueError(
        f'with_population_statistics: the moments have {np.size(moments.mean)} features '
        f'(mean of shape {np.shape(moments.mean)}) but the state has {shape}; pass the moments of this layer.'
    )
  mean, var = (jnp.reshape(a, shape).astype(jnp.float32) for a in (moments.mean, moments.var))
  has_data = jnp.reshape(jnp.broadcast_to(moments.count, np.shape(moments.mean)), shape) > 0
  keep_old = lambda new, field: jnp.where(has_data, new, old[field])
  if not renorm:
    return dict(mean=keep_old(mean, 'mean'), var=keep_old(var, 'var'))
  std = jnp.sqrt(var + epsilon)
  return dict(
      mean=keep_old(mean, 'mean'),
      std=keep_old(std, 'std'),
      renorm_mean=keep_old(mean, 'renorm_mean'),
      renorm_std=keep_old(std, 'renorm_std'),
  )


def with_population_statistics(state, moments, epsilon: float | Array = 1e-3):
  """A layer's state with its moving statistics replaced by pooled (population) moments.

  For a `BatchNormState`, `mean` and `var` become the pooled mean and biased
  variance. For a `BatchRenormState`, `mean` becomes the pooled mean and
  `std` becomes `sqrt(var + epsilon)`, the convention of `bnjax.norm` (so
  inference, `bnjax.moving_statistics`, normalizes with the pooled variance
  `std**2 - epsilon`). The renorm statistics `renorm_mean` and `renorm_std`
  are set to the same values: in Ioffe (2017) they estimate the same
  population statistics (Algorithm 1 has one pair, used for r and d in
  training and for inference; bnjax and Keras keep two only to allow two
  momentums), so training resumed afterwards corrects towards the
  statistics inference now uses. `step` and `decay_product` are unchanged;
  features whose count is 0 (no valid entry was seen) keep their statistics.

  Args:
    state: a `BatchNormState` or `BatchRenormState`, or one layer's
      `batch_stats` dict from `bnjax.linen` (a renorm layer's has `std`);
      other entries of the dict are kept.
    moments: the layer's pooled `Moments` (or a dict with `mean`, `var`,
      `count`), with C features in any shape (e.g. `[C]` or `[1, ..., C]`).
    epsilon: the layer's epsilon (renorm only). Default 1e-3, the default of
      `bnjax.batch_renorm`.

  Returns:
    The state, of the type given in, with `[C]` float32 statistics.
  """
  moments = _as_moments(moments)
  if isinstance(state, (BatchNormState, BatchRenormState)):
    return state._replace(**_population_fields(isinstance(state, BatchRenormState), state._asdict(), moments, epsilon))
  if isinstance(state, Mapping):
    renorm = 'std' in state
    needed = {'mean', 'std', 'renorm_mean', 'renorm_std'} if renorm else {'mean', 'var'}
    if not needed <= set(state):
      raise ValueError(
          f'with_population_statistics: the statistics have keys {sorted(state)}, missing '
          f'{sorted(needed - set(state))}; pass one bnjax.linen layer\'s batch_stats.'
      )
    return {**state, **_population_fields(renorm, state, moments, epsilon)}
  raise TypeError(
      f'with_population_statistics: state is a {type(state).__name__}; expected a BatchNormState, '
      'a BatchRenormState or a layer\'s batch_stats dict.'
  )
