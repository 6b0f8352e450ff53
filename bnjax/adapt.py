"""Test-time adaptation of normalization layers to shifted data, for any Flax linen model.

When the test data shifts (noise, blur, contrast: CIFAR-10-C, MNIST-C), the moving statistics a
model learned describe the wrong distribution. The methods here re-estimate or adapt them:

    source         the model as trained: inference with its moving statistics (`model.apply(..., train=False)`).
    prediction_bn  each test batch normalized with its own statistics (Nado et al. 2020).
    prior_bn       source and test-batch statistics mixed, `w = N / (N + n)` on the source (Schneider et al. 2020).
    adabn          population statistics re-estimated on the target data, then inference (Li et al. 2016):
                   bnjax's precise statistics (`bnjax.linen.precise_batch_stats`) of the target set.
    tent           online, per test batch: predict with batch statistics, then minimise the mean prediction
                   entropy by optax steps on the norm layers' scale and bias only (Wang et al. 2021).

Every function takes `train_apply(variables, x, mutable=...) -> (logits, updated collections)`, the
model in training mode (batch statistics), as `bnjax.linen.precise_batch_stats` does, e.g.
`functools.partial(model.apply, train=True)`; dropout should be off in it. The norm layers are found
by type (`bnjax.linen.BatchNorm`/`BatchRenorm`, `flax.linen.BatchNorm`, `GroupNorm`, `LayerNorm`),
never by name. Nothing is mutated: adapted variables are returned.

    train_apply = functools.partial(model.apply, train=True)
    logits = bnjax.adapt.prediction_bn(train_apply, variables, x_test)          # x_test [n, ...]
    target = {**variables, 'batch_stats': bnjax.adapt.adabn(train_apply, variables, x_batches)}
    logits, state = bnjax.adapt.tent(train_apply, variables, x_batches, optax.adam(1e-3))  # [S, B, K]

NNX models (`bnjax.nnx` layers): `nnx_prediction_bn`, `nnx_adabn` (in place, `bnjax.nnx.precise_statistics`)
and `nnx_tent` take the model itself (and an optional `forward(model, x)`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from bnjax import layers
from bnjax import linen as bn_linen
from bnjax import norm as norm_lib

Array = jnp.ndarray
TrainApply = Callable[..., tuple[Array, Mapping[str, Any]]]

NORM_TYPES = (bn_linen.BatchNorm, nn.BatchNorm, nn.GroupNorm, nn.LayerNorm)
AFFINE = ('scale', 'bias')


# ----------------------------------------------------------------------------
# Prediction-time BN and the prior.


def prediction_bn(train_apply: TrainApply, variables: Mapping[str, Any], x: Array) -> Array:
  """Logits of `x [n, ...]` with every BN layer normalizing by the statistics of this batch (n is the test
  batch size: call it per batch of the size you mean). The moving statistics are left as they are.

  Batch renorm layers normalize by the batch statistics alone (r = 1, d = 0): in training mode their r and d
  would map the batch statistics back to the moving ones, which is the source model again.
  """
  with renorm_as_batch_norm():
    logits, _ = train_apply(variables, x, mutable=['batch_stats'])
  return logits


def renorm_as_batch_norm():
  """A context in which every training-mode `bnjax.linen.BatchRenorm` call returns its input normalized by the
  batch statistics alone (r = 1, d = 0). The layer still runs (so it records the moments of its input for
  precise statistics, and the layers after it see batch-normalized inputs)."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != '__call__' or not isinstance(module, bn_linen.BatchRenorm)
        or _use_running_average(module, args, kwargs)):
      return next_fun(*args, **kwargs)
    next_fun(*args, **kwargs)
    return _mixed_norm(module, args[0], 0.0, kwargs.get('mask'))

  return nn.intercept_methods(interceptor)


def prior_weight(prior_n: float, batch_size: int) -> float:
  """Schneider et al.'s weight of the source statistics, `N / (N + n)` (1 for N = inf)."""
  return 1.0 if prior_n == float('inf') else prior_n / (prior_n + batch_size)


def _use_running_average(module, args, kwargs) -> bool:
  given = kwargs.get('use_running_average', args[1] if len(args) > 1 else None)
  return bool(nn.merge_param('use_running_average', module.use_running_average, given))


def _mixed_norm(module: bn_linen.BatchNorm, x: Array, weight: float, mask) -> Array:
  """y = (x - mean) / sqrt(var + eps) * scale + bias with mean, var = w * source + (1 - w) * batch."""
  axes = layers.feature_axes(jnp.ndim(x), module.axis)
  stats = module.variables['batch_stats']
  source_mean, source_var = norm_lib.moving_statistics(bn_linen.norm_state(stats), module.epsilon)
  batch = layers.input_moments(x, module.axis, mask, None, None)
  mean = weight * source_mean + (1 - weight) * batch.mean
  var = weight * source_var + (1 - weight) * batch.var
  shape = [1] * jnp.ndim(x)
  for a in axes:
    shape[a] = x.shape[a]
  reshape = lambda v: jnp.reshape(v, shape)
  y = (x - reshape(mean)) * jax.lax.rsqrt(reshape(var) + module.epsilon)
  params = module.variables.get('params', {})
  if module.use_scale:
    y = y * reshape(params['scale'])
  if module.use_bias:
    y = y + reshape(params['bias'])
  return y.astype(x.dtype)


def prior_bn(train_apply: TrainApply, variables: Mapping[str, Any], x: Array, prior_n: float) -> Array:
  """Logits of `x [n, ...]` with each bnjax BN layer normalizing by `w * source + (1 - w) * batch` statistics,
  `w = N / (N + n)` (Schneider et al. 2020: N = 0 is `prediction_bn`, N -> inf the source model).

  The source statistics are each layer's inference statistics (`bnjax.moving_statistics`: mean/var, or
  renorm's mean and std**2 - epsilon); the batch's are those of the layer's input over the whole test
  batch (ghost BN layers too). Only `bnjax.linen` layers are mixed; others run as in training mode.
  """
  weight = prior_weight(prior_n, x.shape[0])

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != '__call__' or not isinstance(module, bn_linen.BatchNorm)
        or _use_running_average(module, args, kwargs)):
      return next_fun(*args, **kwargs)
    return _mixed_norm(module, args[0], weight, kwargs.get('mask'))

  with nn.intercept_methods(interceptor):
    logits, _ = train_apply(variables, x, mutable=['batch_stats'])
  return logits


# ----------------------------------------------------------------------------
# AdaBN.


def adabn(train_apply: TrainApply, variables: Mapping[str, Any], batches: Any, *,
          num_examples: int | None = None) -> dict:
  """AdaBN: the `batch_stats` of `variables` with every BN layer's population statistics re-estimated on the
  target `batches` (`[S, B, ...]` or an iterable; all of them by default): bnjax's precise statistics
  (`bnjax.linen.precise_batch_stats`), then ordinary inference with them. Batch renorm layers run as plain
  BN in the passes (`renorm_as_batch_norm`), so that each layer's statistics are those of the inputs it
  will see at inference with the new statistics."""
  with renorm_as_batch_norm():  # each layer's input as inference with the re-estimated statistics will see it
    return bn_linen.precise_batch_stats(train_apply, variables, batches, num_examples=num_examples)


# ----------------------------------------------------------------------------
# TENT.


def norm_module_paths(train_apply: TrainApply, variables: Mapping[str, Any], x: Array) -> tuple[tuple, ...]:
  """The module paths (e.g. `('norm_0',)`) of the norm layers (`NORM_TYPES`) a training call runs, by type."""
  found = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and isinstance(context.module, NORM_TYPES):
      path = tuple(context.module.path)
      if path not in found:
        found.append(path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v, x: train_apply(v, x, mutable=['batch_stats']), variables, x)
  return tuple(found)


def split_norm_params(params: Mapping[str, Any], paths: Iterable[tuple]) -> tuple[dict, dict]:
  """`(norm, rest)`: the flat `{path: array}` of the scale and bias of the modules at `paths`, and the others."""
  paths = set(map(tuple, paths))
  flat = traverse_util.flatten_dict(params)
  norm = {k: v for k, v in flat.items() if k[:-1] in paths and k[-1] in AFFINE}
  return norm, {k: v for k, v in flat.items() if k not in norm}


def merge_params(norm: Mapping[tuple, Any], rest: Mapping[tuple, Any]) -> dict:
  return traverse_util.unflatten_dict({**rest, **norm})


def mean_entropy(logits: Array) -> Array:
  """The mean over the batch of the entropy of softmax(logits) `[n, K]`: TENT's loss."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, axis=-1))


class TentState(NamedTuple):
  """What TENT carries from batch to batch: the norm layers' scale and bias (flat `{path: array}`) and the
  optimizer's state over them."""

  norm_params: Any
  opt_state: Any


def tent_init(optimizer: optax.GradientTransformation, norm_params: Mapping[tuple, Any]) -> TentState:
  return TentState(dict(norm_params), optimizer.init(dict(norm_params)))


def tent_step(train_apply: TrainApply, optimizer: optax.GradientTransformation, variables: Mapping[str, Any],
              rest: Mapping[tuple, Any], state: TentState, x: Array) -> tuple[Array, TentState]:
  """One TENT step on the batch `x`: `(logits before the update, state after it)`.

  The forward pass normalizes with the batch statistics (`prediction_bn`); the loss is `mean_entropy` of its
  logits; the gradient w.r.t. the norm scale and bias only goes through `optimizer`. The moving statistics
  are not updated (TENT uses batch statistics throughout).
  """

  def loss(norm_params):
    params = merge_params(norm_params, rest)
    logits = prediction_bn(train_apply, {**variables, 'params': params}, x)
    return mean_entropy(logits), logits

  grads, logits = jax.grad(loss, has_aux=True)(state.norm_params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.norm_params)
  return logits, TentState(optax.apply_updates(state.norm_params, updates), opt_state)


def tent(train_apply: TrainApply, variables: Mapping[str, Any], batches: Array,
         optimizer: optax.GradientTransformation, *, episodic: bool = False, steps: int = 1,
         state: TentState | None = None) -> tuple[Array, TentState]:
  """TENT over test batches `[S, B, ...]` in order, in one jitted scan: `(logits [S, B, K], final state)`.

  Per batch: `steps` TENT steps (`tent_step`); the batch's predictions are the logits of the last step's
  forward pass, before its update (as the reference implementation). Continual (default): the adapted
  scale, bias and optimizer state carry over to the next batch; `episodic=True`: every batch starts from
  the source model (`state`, or the model's own scale and bias with a fresh optimizer state).
  """
  paths = norm_module_paths(train_apply, variables, batches[0])
  norm, rest = split_norm_params(variables['params'], paths)
  if not norm:
    raise ValueError('tent: the model has no norm layer with a scale or bias to adapt (found by type: '
                     f'{", ".join(t.__name__ for t in NORM_TYPES)}).')
  start = state if state is not None else tent_init(optimizer, norm)

  def body(carry, x):
    current = start if episodic else carry
    logits = None
    for _ in range(steps):
      logits, current = tent_step(train_apply, optimizer, variables, rest, current, x)
    return current, logits

  final, logits = jax.lax.scan(body, start, batches)
  return logits, final


def tent_variables(variables: Mapping[str, Any], state: TentState) -> dict:
  """`variables` with TENT's adapted scale and bias written in."""
  _, rest = split_norm_params(variables['params'], ())
  flat = dict(rest)
  flat.update(state.norm_params)
  return {**variables, 'params': traverse_util.unflatten_dict(flat)}


# ----------------------------------------------------------------------------
# NNX models (`bnjax.nnx` layers, and flax.nnx's norm layers for TENT): the same methods.


def _nnx_norm_modules(model):
  from flax import nnx

  from bnjax import nnx as bn_nnx

  types = (bn_nnx.BatchNorm, nnx.BatchNorm, nnx.GroupNorm, nnx.LayerNorm)
  return [(tuple(path), module) for path, module in nnx.iter_modules(model) if isinstance(module, types)]


def _nnx_training_copy(graphdef, *states):
  """A fresh model from `states` with every bnjax norm layer in training mode (batch statistics)."""
  from flax import nnx

  from bnjax import nnx as bn_nnx

  model = nnx.merge(graphdef, *states, copy=True)
  for _, layer in bn_nnx.norm_layers(model):
    layer.use_running_average, layer.frozen = False, False
  return _nnx_renorm_as_batch_norm(model)


def _nnx_renorm_as_batch_norm(model):
  """`model` (a copy) with every `bnjax.nnx.BatchRenorm` normalizing by the batch statistics alone: r and d
  clipped to 1 and 0 (rmax = 1, dmax = 0), as `renorm_as_batch_norm` does for linen. Returns `model`."""
  from bnjax import nnx as bn_nnx

  for _, layer in bn_nnx.norm_layers(model):
    if isinstance(layer, bn_nnx.BatchRenorm):
      layer.rmax, layer.dmax = 1.0, 0.0
  return model


def nnx_prediction_bn(model, x: Array, *, forward: Callable | None = None) -> Array:
  """`prediction_bn` for an NNX model: logits of `x` normalized by its own statistics; `model` is unchanged.
  `forward(model, x)` (default `model(x)`)."""
  from flax import nnx

  forward = forward or (lambda m, x: m(x))
  return forward(_nnx_training_copy(*nnx.split(model)), x)


def nnx_adabn(model, batches: Any, *, forward: Callable | None = None, num_examples: int | None = None):
  """`adabn` for an NNX model, in place: `bnjax.nnx.precise_statistics` over the target batches, with batch
  renorm layers as plain BN in the passes (each layer's statistics are those of the inputs inference with the
  re-estimated statistics will give it). Returns model."""
  from bnjax import nnx as bn_nnx

  forward = forward or (lambda m, x: m(x))
  return bn_nnx.precise_statistics(model, batches, forward=lambda m, x: forward(_nnx_renorm_as_batch_norm(m), x),
                                   num_examples=num_examples)


def nnx_tent(model, batches: Array, optimizer: optax.GradientTransformation, *, episodic: bool = False,
             steps: int = 1, forward: Callable | None = None) -> Array:
  """`tent` for an NNX model: logits `[S, B, K]`; the adapted scale and bias (after the last batch) are
  written into `model`; its statistics are left as they are."""
  from flax import nnx

  forward = forward or (lambda m, x: m(x))
  paths = {path for path, _ in _nnx_norm_modules(model)}
  is_norm_param = lambda path, value: isinstance(value, nnx.Param) and tuple(path[:-1]) in paths and path[-1] in AFFINE
  graphdef, norm_params, rest = nnx.split(model, is_norm_param, ...)
  if not jax.tree.leaves(norm_params):
    raise ValueError('nnx_tent: the model has no norm layer with a scale or bias to adapt.')

  def step(state, x):
    def loss(params):
      logits = forward(_nnx_training_copy(graphdef, params, rest), x)
      return mean_entropy(logits), logits

    grads, logits = jax.grad(loss, has_aux=True)(state.norm_params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.norm_params)
    return logits, TentState(optax.apply_updates(state.norm_params, updates), opt_state)

  start = TentState(norm_params, optimizer.init(norm_params))

  def body(carry, x):
    current = start if episodic else carry
    logits = None
    for _ in range(steps):
      logits, current = step(current, x)
    return current, logits

  final, logits = jax.jit(lambda b: jax.lax.scan(body, start, b))(batches)
  if not episodic:
    nnx.update(model, final.norm_params)
  return logits
