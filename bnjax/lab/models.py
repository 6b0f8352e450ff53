"""The lab's models as Flax modules: `LabModel` around any builder, and the seed models' `Net`.

    model = bnjax.lab.models.get('mnist_mlp', norm='bn', dropout_placement='end')
    variables = model.init(key, x)                       # {'params', 'batch_stats'}
    logits, updates = model.apply(variables, x, train=True, rngs={'dropout': key},
                                  mutable=['batch_stats'])
    logits = model.apply({**variables, **updates}, x)    # evaluation

`get(name)` gives a `LabModel`: the module of a builder of the registry
(`bnjax.lab.registry`: a name, or an import path `package.module:build`)
with the lab's options. The builder's module is built inside the call with
the norm layers of `norm_layer` (the one function that builds them, from the
option table, with the run's norm options and call-time values) and shares
the `LabModel`'s scope, so its variables are its own (`params['linear_0']`).
Norm layers are found by their module type (`NORM_LAYER_TYPES`), never by
their names: frozen BN, the probes of models without their own, and the
weight-decay mask (`norm_layer_paths`, `norm_parameter_mask`).

The seed models are `Net`s: a stack of *norm blocks* (a Dense or 3x3 Conv layer,
its normalization and its activation, in the order `norm_position` says),
with flatten and max-pool steps between them, and a Dense classifier `head`.
The output is logits: the softmax belongs to the loss. ResNet-20/32/56 are
`bnjax.lab.resnet.ResNet`.

Models: `names()`, the registry's, each described by its
`bnjax.lab.registry.Entry`; `defaults(name)` gives the options and the
model's own training hyperparameters. The source's MNIST MLP (`mnist_mlp`)
has 376,650 parameters without norm, with BN 379,338 + 2,688 moving
statistics; its CIFAR-10 CNN (`cifar_cnn`) with BN 815,530 + 1,408 moving
statistics (Keras's counts).

Linear layers keep their bias even before BN (Keras's default: the counts
above include them) and are initialised as in Keras (`glorot_uniform`
weights, zero biases) unless `kernel_init` says otherwise.

Options (fields of `LabModel`, each given to the builder that takes it; `get` checks them):
- structure: `norm` (a kind of `bnjax.lab.options.NORM_KINDS`, which says
  the options it requires and takes), `activation` (`ACTIVATIONS`),
  `norm_position` (`NORM_POSITIONS`), `dropout_placement` (below), `layers`
  (the architecture), `num_classes`, `kernel_init` (`KERNEL_INITS`).
- norm options (`NORM_LAYER_OPTIONS`, e.g. `momentum`, `epsilon`, `center`,
  `scale`: turn them off after the activation, as the source suggests), each
  given to the norm layers whose kind takes it; and `axis_name`.
- `dropout_rate`.

Dropout placements (with norm='none' dropout stands at the same places, so
runs with and without BN compare fairly); per block:
- `none`: no dropout.
- `before_norm`: dropout feeds every norm layer (the harmful case of Li et al.
  2019): Dense -> Dropout -> Norm -> Act, or Dense -> Act -> Dropout -> Norm.
- `after_norm`: dropout ends every block: Dense -> Norm -> Act -> Dropout, or
  Dense -> Act -> Norm -> Dropout.
- `end`: once, after the last block, before the classifier (the source's advice).

Hyperparameter values. The values a sweep varies, `HPARAMS` (the option
table's model values: momentum, rmax, dropout_rate, ...), are fields too
(numbers, arrays or schedules), and `apply(..., hparams={...})` overrides
them at call time with numbers or arrays. Under `jax.vmap` over both the variables and `hparams`,
one program trains K models with K momentums:

    def step(variables, momentum):
      return model.apply(variables, x, train=True, hparams={'momentum': momentum},
                         mutable=['batch_stats'])
    jax.vmap(step)(stacked_variables, jnp.array([0.9, 0.99, 0.999]))

Everything else (kinds, placements, sizes, epsilon, virtual_batch_size) is
structure: it changes the program and is fixed when the module is built.

Probes: `apply(..., mutable=['probes'], probe_unit=u)` also returns, without
changing the output, `probes['block_<i>']` for every block i in order, with
`norm_input` (what block i's norm layer normalizes; for norm='none' what it
would normalize) and `activation_input` (what block i's activation receives:
the BN paper's Figure 1 plots its percentiles for a last-layer sigmoid), each
`{'mean': [C], 'var': [C], 'percentiles': [3]}`: the per-feature batch mean
and biased variance (over the batch and, for convs, the positions) and the
15th/50th/85th percentiles of unit `u`. Comparing the `norm_input` variance
of an evaluation pass with the layer's moving variance measures dropout's
variance shift. Nothing is computed when 'probes' is not mutable.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnjax import moments as moments_lib
from bnjax.lab import conv as conv_lib
from bnjax.lab import options as options_lib

Array = jnp.ndarray

ACTIVATIONS = {'relu': nn.relu, 'swish': nn.swish, 'sigmoid': nn.sigmoid}
NORM_POSITIONS = options_lib.OPTIONS['norm_position'].allowed()
DROPOUT_PLACEMENTS = options_lib.OPTIONS['dropout_placement'].allowed()
CONV_IMPLS = options_lib.OPTIONS['conv_impl'].allowed()
KERNEL_INITS = {
    'glorot_uniform': nn.initializers.glorot_uniform(),  # Keras's default
    'lecun_normal': nn.initializers.lecun_normal(),  # Flax's default
}
NORMS = tuple(options_lib.NORM_KINDS)  # the norm kinds of the table (at import; `register_norm_kind` adds more)
# Values that `apply(..., hparams=...)` may override (and `jax.vmap` batch over): the option table's model values.
HPARAMS = tuple(name for name, option in options_lib.OPTIONS.items() if option.model_value)
# Options of the norm layers (`Net.norm_options`), each taken by the norm kinds that name it.
NORM_LAYER_OPTIONS = tuple(name for name, option in options_lib.OPTIONS.items() if option.layer_arg)
PROBE_PERCENTILES = (15.0, 50.0, 85.0)  # the BN paper's Figure 1
# The architecture: a tuple of steps, each one of these, e.g. ('dense', 256).
LAYER_STEPS = {'flatten': 0, 'pool': 1, 'dense': 1, 'conv': 1}  # step -> number of int arguments
BLOCK_STEPS = ('dense', 'conv')


# ----------------------------------------------------------------------------
# Pure pieces.


def dropout(x: Array, rate: float | Array, rng: Array) -> Array:
  """Inverted dropout: zeroes each entry with probability `rate`, scales the rest by 1 / (1 - rate).

  Unlike `flax.linen.Dropout`, `rate` may be a traced value (swept under `vmap`).

  Args:
    x: any shape.
    rate: drop probability in [0, 1]; a number or a scalar array.
    rng: PRNG key.
  """
  keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
  keep = jax.random.bernoulli(rng, keep_prob, x.shape)
  # The maximum keeps rate = 1 finite (all entries dropped, zero gradient).
  factor = jnp.where(keep, 1.0 / jnp.maximum(keep_prob, jnp.finfo(jnp.float32).tiny), 0.0)
  return x * factor.astype(x.dtype)


def probe_statistics(x: Array, unit: int) -> dict:
  """Statistics of a layer's input over the batch, for probes.

  Args:
    x: `[N, C]` or `[N, H, W, C]`.
    unit: the feature whose percentiles are taken.

  Returns:
    `{'mean': [C], 'var': [C], 'percentiles': [3]}`: per-feature mean and
    biased variance over every axis but the last (two-pass, float32), and the
    `PROBE_PERCENTILES` of `x[..., unit]` over all its entries.
  """
  num_features = x.shape[-1]
  if not 0 <= unit < num_features:
    raise ValueError(f'probe_unit={unit!r} is not a unit of a layer with {num_features} features.')
  x = jax.lax.stop_gradient(x.astype(moments_lib.compute_dtype(x.dtype)))
  moments = moments_lib.batch_moments(x, tuple(range(x.ndim - 1)))
  return {
      'mean': moments.mean.reshape(num_features),
      'var': moments.var.reshape(num_features),
      'percentiles': jnp.percentile(x[..., unit], jnp.asarray(PROBE_PERCENTILES)),
  }


def count_parameters(variables: Mapping) -> dict:
  """`{'trainable': ..., 'moving_statistics': ...}`: numbers of floats, as Keras counts them.

  Trainable: every entry of `params`. Moving statistics: every entry of the
  `[C]` vectors in `batch_stats` (moving mean and variance for BN; mean,
  std, renorm mean and std for renorm); the scalar bookkeeping of the state
  (`step`, `decay_product`) is not counted.
  """
  trainable = sum(np.size(leaf) for leaf in jax.tree.leaves(variables.get('params', {})))
  moving = sum(np.size(leaf) for leaf in jax.tree.leaves(variables.get('batch_stats', {})) if np.ndim(leaf) > 0)
  return {'trainable': int(trainable), 'moving_statistics': int(moving)}


# ----------------------------------------------------------------------------
# Checks.


def _check_choice(option: str, value: Any, choices) -> None:
  if value not in choices:
    raise ValueError(f'{option}={value!r} is not one of {", ".join(map(repr, choices))}.')


def _check_layers(layers) -> None:
  valid = '; expected a tuple of steps like (("flatten",), ("dense", 256), ("conv", 32), ("pool", 2)).'
  if not isinstance(layers, (tuple, list)):
    raise ValueError(f'layers={layers!r} is not a tuple of steps{valid}')
  for step in layers:
    if not isinstance(step, (tuple, list)) or not step or step[0] not in LAYER_STEPS:
      raise ValueError(f'layers: step {step!r} is not one of {tuple(LAYER_STEPS)}{valid}')
    arguments = step[1:]
    if len(arguments) != LAYER_STEPS[step[0]] or not all(
        isinstance(a, (int, np.integer)) and a > 0 for a in arguments
    ):
      raise ValueError(f'layers: step {step!r} takes {LAYER_STEPS[step[0]]} positive int(s){valid}')
  if not any(step[0] in BLOCK_STEPS for step in layers):
    raise ValueError(f'layers={layers!r} has no dense or conv block{valid}')


def _is_default(value, default) -> bool:
  """True for a concrete value equal to the default (a traced value may be anything)."""
  return value is default or (isinstance(value, (int, float, bool, str, np.number)) and value == default)


def _is_zero(value) -> bool:
  """True only for a concrete 0 (a traced rate may be anything)."""
  return isinstance(value, (int, float, np.number)) and value == 0


# ----------------------------------------------------------------------------
# Norm layers: built by one function from the option table, found by their type.


def norm_layer(kind: str, options: Mapping[str, Any], axis_name: Any = None) -> Callable[..., Callable]:
  """The norm-layer factory a builder receives: `factory(name=None) -> layer`, `layer(x, use_running_average)`.

  Args:
    kind: a norm kind of the option table (`bnjax.lab.options.NORM_KINDS`).
    options: values of the kind's layer options (numbers, call-time arrays
      of a vmapped sweep, or schedules); the table's defaults fill the rest.
    axis_name: the data-parallel axis of cross-device kinds (synchronized BN).

  With `kind='none'` every layer is the identity (and creates no variables).
  """
  norm_kind = options_lib.norm_kind(kind)
  if norm_kind.layer is None:
    return lambda name=None: _identity
  layer_options = {option: options.get(option, options_lib.OPTIONS[option].default)
                   for option in norm_kind.options if options_lib.OPTIONS[option].layer_arg}
  if norm_kind.cross_device:
    layer_options['axis_name'] = axis_name
  return lambda name=None: norm_kind.layer(layer_options, name)


def _identity(x: Array, use_running_average: bool | None = None) -> Array:
  return x


def _import_type(path: str) -> type:
  import importlib

  module, _, attribute = path.partition(':')
  return getattr(importlib.import_module(module), attribute)


# The module types that are norm layers (the table's `NormKind.layer_types`): the probes, frozen BN and the
# weight-decay mask find norm layers by these types, whatever their names.
NORM_LAYER_TYPES = tuple(dict.fromkeys(_import_type(path) for kind in options_lib.NORM_KINDS.values()
                                       for path in kind.layer_types))


def is_norm_layer(module: Any) -> bool:
  return isinstance(module, NORM_LAYER_TYPES)


def _takes_running_average(module: nn.Module) -> bool:
  return hasattr(module, 'use_running_average')


class _NormCalls:
  """An interceptor of norm-layer calls (`flax.linen.intercept_methods`): records each layer's path and
  input in call order, and with `freeze` makes layers with moving statistics use them (frozen BN)."""

  def __init__(self, freeze: bool = False):
    self.freeze = freeze
    self.paths: list[tuple] = []
    self.inputs: list[Array] = []

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or not is_norm_layer(module):
      return next_fun(*args, **kwargs)
    self.paths.append(tuple(module.path))
    self.inputs.append(args[0])
    if self.freeze and _takes_running_average(module):
      args, kwargs = args[:1], {**kwargs, 'use_running_average': True}
    return next_fun(*args, **kwargs)


def norm_layer_paths(model: nn.Module, sample: Array) -> list[tuple]:
  """The paths (tuples of names) of `model`'s norm layers, in call order, found by type on a `sample [N, ...]`.

  Traced abstractly (`jax.eval_shape`): no computation.
  """
  calls = _NormCalls()

  def init(x):
    with nn.intercept_methods(calls):
      return model.init({'params': jax.random.key(0), 'dropout': jax.random.key(0)}, x, train=False)

  jax.eval_shape(init, sample)
  return list(dict.fromkeys(calls.paths))


def norm_parameter_mask(paths: list[tuple]) -> Callable[[Any], Any]:
  """`params -> pytree of bool`: False for the parameters of the norm layers at `paths`, True elsewhere
  (optax's `mask`: weight decay then leaves the norm layers' scale and bias alone)."""
  prefixes = [tuple(path) for path in paths]

  def mask(params):
    import flax.traverse_util as traverse

    return traverse.path_aware_map(
        lambda path, _: not any(tuple(path[: len(p)]) == p for p in prefixes), params)

  return mask


def subtree(tree: Mapping, path: tuple) -> Any:
  """`tree[path[0]][path[1]]...`, or None when a name is missing."""
  for name in path:
    if not isinstance(tree, Mapping) or name not in tree:
      return None
    tree = tree[name]
  return tree


# ----------------------------------------------------------------------------
# The seed models: norm blocks and a Dense classifier (the step language of the source's models).


class Net(nn.Module):
  """Norm blocks and a Dense classifier; see the module docstring.

  Call: `logits = Net(...)(x, train=False, *, probe_unit=0)`; x `[N, ...]`,
  logits `[N, num_classes]`. `norm` is the factory of `norm_layer`,
  `activation` a function, `dropout` a function `(x, train) -> x` (None: no
  dropout); `LabModel` gives them.
  """

  layers: tuple
  num_classes: int = 10
  norm: Callable[..., Callable] = norm_layer('none', {})
  activation: Callable[[Array], Array] = nn.relu
  norm_position: str = 'before_activation'
  dropout: Callable[[Array, bool], Array] | None = None
  dropout_placement: str = 'none'
  kernel_init: str = 'glorot_uniform'
  conv_impl: str = 'xla'

  def __post_init__(self):
    _check_layers(self.layers)
    _check_choice('norm_position', self.norm_position, NORM_POSITIONS)
    _check_choice('dropout_placement', self.dropout_placement, DROPOUT_PLACEMENTS)
    _check_choice('kernel_init', self.kernel_init, tuple(KERNEL_INITS))
    _check_choice('conv_impl', self.conv_impl, CONV_IMPLS)
    super().__post_init__()

  def _dropout(self, x: Array, train: bool) -> Array:
    return x if self.dropout is None else self.dropout(x, train)

  def _block(self, index, step, x, train, probe_unit) -> Array:
    """Linear -> [dropout] -> norm -> activation (or linear -> activation -> [dropout] -> norm) -> [dropout]."""
    kind, features = step
    kernel_init = KERNEL_INITS[self.kernel_init]
    if kind == 'dense':
      linear = nn.Dense(features, kernel_init=kernel_init, name=f'linear_{index}')
    else:
      conv = conv_lib.Conv if self.conv_impl == 'cpu_fast' else nn.Conv
      linear = conv(features, (3, 3), padding='SAME', kernel_init=kernel_init, name=f'linear_{index}')
    norm = self.norm(name=f'norm_{index}')
    probes = {}
    x = linear(x)
    order = ('norm', 'activation') if self.norm_position == 'before_activation' else ('activation', 'norm')
    for stage in order:
      if stage == 'norm':
        if self.dropout_placement == 'before_norm':
          x = self._dropout(x, train)
        probes['norm_input'] = x
        x = norm(x, use_running_average=not train)
      else:
        probes['activation_input'] = x
        x = self.activation(x)
    if self.dropout_placement == 'after_norm':
      x = self._dropout(x, train)
    if self.is_mutable_collection('probes') and not self.is_initializing():
      self.sow(
          'probes', f'block_{index}',
          {site: probe_statistics(value, probe_unit) for site, value in probes.items()},
          init_fn=dict, reduce_fn=lambda _, new: new,
      )
    return x

  @nn.compact
  def __call__(self, x: Array, train: bool = False, *, probe_unit: int = 0) -> Array:
    num_blocks = sum(step[0] in BLOCK_STEPS for step in self.layers)
    index = 0
    for step in self.layers:
      if step[0] == 'flatten':
        x = x.reshape(x.shape[0], -1)
      elif step[0] == 'pool':
        if self.conv_impl == 'cpu_fast':
          x = conv_lib.max_pool(x, step[1])
        else:
          x = nn.max_pool(x, (step[1], step[1]), strides=(step[1], step[1]))
      else:
        x = self._block(index, tuple(step), x, train, probe_unit)
        index += 1
        if index == num_blocks and self.dropout_placement == 'end':
          x = self._dropout(x, train)
    return nn.Dense(self.num_classes, kernel_init=KERNEL_INITS[self.kernel_init], name='head')(x)


def mlp_layers(widths) -> tuple:
  return (('flatten',),) + tuple(('dense', width) for width in widths)


def cnn_layers(channels, dense) -> tuple:
  conv = tuple(step for c in channels for step in (('conv', c), ('conv', c), ('pool', 2)))
  return conv + (('flatten',), ('dense', dense))


def mlp(widths=(256, 128, 512, 64, 128, 256), *, layers=None, kernel_init='glorot_uniform', norm, activation,
        norm_position, dropout, dropout_placement, num_classes=10) -> Net:
  """The registry's builder of the MLPs: Flatten, a Dense block per width (`layers`: any steps instead)."""
  return Net(layers or mlp_layers(widths), num_classes, norm, activation, norm_position, dropout, dropout_placement,
             kernel_init)


def cnn(channels=(32, 64, 128), dense=256, *, layers=None, kernel_init='glorot_uniform', norm, activation,
        norm_position, dropout, dropout_placement, conv_impl='xla', num_classes=10) -> Net:
  """The registry's builder of the CNN: 2 conv blocks and a max pool per channel count, a Dense block."""
  return Net(layers or cnn_layers(channels, dense), num_classes, norm, activation, norm_position, dropout,
             dropout_placement, kernel_init, conv_impl)


# ----------------------------------------------------------------------------
# Any builder's module, adapted to what the lab's programs call.


class LabModel(nn.Module):
  """A registered or user model (`bnjax.lab.registry`) with the lab's options; see the module docstring.

  Call: `logits = model(x, train=False, *, hparams=None, probe_unit=0, freeze_norm=False)`.
  The builder's module is built inside the call, with the norm layers of
  `norm_layer` carrying `norm_options` and the call-time `hparams`, and shares
  this module's scope: its variables are the builder module's own
  (`params['linear_0']`, not nested). `freeze_norm=True` (with `train`):
  frozen BN, every norm layer with moving statistics uses them and leaves
  them unchanged. Probes: the builder module's own (`Net`), or else each norm
  layer's input, as `probes['block_<i>']['norm_input']` in call order.
  """

  model: str = 'mnist_mlp'
  model_options: Mapping[str, Any] = flax.core.FrozenDict()
  num_classes: int = 10
  norm: str = 'bn'
  activation: str = 'relu'
  norm_position: str = 'before_activation'
  dropout_placement: str = 'none'
  dropout_rate: float = 0.5
  conv_impl: str = 'xla'
  norm_options: Mapping[str, Any] = flax.core.FrozenDict()
  axis_name: Any = None

  def __post_init__(self):
    from bnjax.lab import registry

    registry.resolve(self.model)
    _check_choice('norm', self.norm, tuple(options_lib.NORM_KINDS))
    _check_choice('activation', self.activation, tuple(ACTIVATIONS))
    _check_choice('norm_position', self.norm_position, NORM_POSITIONS)
    _check_choice('dropout_placement', self.dropout_placement, DROPOUT_PLACEMENTS)
    _check_choice('conv_impl', self.conv_impl, CONV_IMPLS)
    for option in registry.BUILDER_ARGUMENTS:
      if option == 'dropout_rate':  # a rate acts only with a placement, which is checked
        continue
      value = getattr(self, option)
      default = LAB_DEFAULTS[option]
      if not registry.takes(self.model, option) and not _is_default(value, default):
        raise ValueError(f'--{option}={value!r} is invalid with --model={self.model}: its builder does not take '
                         f'{registry.BUILDER_ARGUMENTS[option]!r} (leave it at {default!r}).')
    kind = options_lib.NORM_KINDS[self.norm]
    for name, value in self.norm_options.items():
      option = options_lib.OPTIONS.get(name)
      if option is None or not option.layer_arg:
        raise ValueError(f'norm_options has {name!r}; the norm layer options are {list(NORM_LAYER_OPTIONS)}.')
      if name not in kind.options and not _is_default(value, option.default):
        takers = ', '.join(f"norm='{k.name}'" for k in options_lib.NORM_KINDS.values() if name in k.options)
        raise ValueError(f'{name}={value!r} is given with norm={self.norm!r}, which does not take it; '
                         f'the norm kinds that take it: {takers}.')
    for name, expected in kind.required.items():
      if self.norm_options.get(name) is None:
        raise ValueError(f"norm={self.norm!r} needs {name}: {expected}.")
    rate = self.dropout_rate
    if isinstance(rate, (int, float, np.number)) and not 0.0 <= rate < 1.0:
      raise ValueError(f'dropout_rate={rate!r} must be in [0, 1).')
    super().__post_init__()

  @property
  def virtual_batch_size(self) -> int | None:
    """The ghost batch size of the norm layers (None: whole batches)."""
    return self.norm_options.get('virtual_batch_size')

  @property
  def epsilon(self) -> float:
    """The norm layers' epsilon."""
    return self.norm_options.get('epsilon', options_lib.OPTIONS['epsilon'].default)

  def _values(self, hparams: Mapping | None) -> dict:
    hparams = dict(hparams or {})
    unknown = sorted(set(hparams) - set(HPARAMS))
    if unknown:
      raise ValueError(f'hparams has {unknown}; the values it may override are {list(HPARAMS)}.')
    return {'dropout_rate': self.dropout_rate, **self.norm_options, **hparams}

  def _dropout(self, rate, x: Array, train: bool) -> Array:
    if not train or _is_zero(rate) or self.dropout_placement == 'none':
      return x
    return dropout(x, rate, self.make_rng('dropout'))

  @nn.compact
  def __call__(self, x: Array, train: bool = False, *, hparams: Mapping | None = None, probe_unit: int = 0,
               freeze_norm: bool = False) -> Array:
    module = build_module(self, self._values(hparams))
    nn.share_scope(self, module)
    own_probes = 'probe_unit' in inspect.signature(module.__call__).parameters
    calls = _NormCalls(freeze=freeze_norm)
    with nn.intercept_methods(calls):
      logits = module(x, train, probe_unit=probe_unit) if own_probes else module(x, train)
    if not own_probes and self.is_mutable_collection('probes') and not self.is_initializing():
      for index, value in enumerate(calls.inputs):
        self.sow('probes', f'block_{index}', {'norm_input': probe_statistics(value, probe_unit)},
                 init_fn=dict, reduce_fn=lambda _, new: new)
    return logits


def build_module(self: 'LabModel', values: Mapping[str, Any]) -> nn.Module:
  """The builder's module of `LabModel` `self` for these option values (a function, not a method: called
  outside a module, the module it returns is unbound; inside `LabModel.__call__`, it becomes its child)."""
  from bnjax.lab import registry

  entry = registry.resolve(self.model)
  takes = registry.builder_arguments(self.model)
  given = {
      'norm': norm_layer(self.norm, values, self.axis_name),
      'activation': ACTIVATIONS[self.activation],
      'norm_position': self.norm_position,
      'dropout': functools.partial(self._dropout, values['dropout_rate']),
      'dropout_placement': self.dropout_placement,
      'conv_impl': self.conv_impl,
      'num_classes': self.num_classes,
  }
  arguments = {**entry.options, **self.model_options, **{k: v for k, v in given.items() if k in takes}}
  try:
    module = registry.builder(self.model)(**arguments)
  except Exception as error:  # the user's builder: its failure as one line
    raise ValueError(f'--model={self.model}: its builder raised {type(error).__name__}: {error}') from None
  if not isinstance(module, nn.Module):
    raise ValueError(f'--model={self.model}: its builder returned a {type(module).__name__}, not a Flax linen '
                     'module (an NNX module: wrap it with flax.nnx.bridge.ToLinen).')
  return module


LAB_DEFAULTS = {field.name: field.default for field in dataclasses.fields(LabModel)
                if field.init and field.name not in ('parent', 'name')}


def check_norm_layers(model: nn.Module, paths: list[tuple]) -> None:
  """A one-line error when a norm is asked for (`model.norm` other than none) and the model has no norm layer."""
  from bnjax.lab import registry

  norm = getattr(model, 'norm', 'none')
  if norm != 'none' and not paths and registry.takes(model.model, 'norm'):
    raise ValueError(f'--norm={norm} asks for norm layers, but --model={model.model} built none: its builder '
                     'must call the norm factory it receives (or run it with --norm=none).')


# An input of each data set, for tracing a model whose input is not given.
SAMPLE_SHAPES = {'mnist': (1, 28, 28, 1), 'fashion_mnist': (1, 28, 28, 1), 'cifar10': (1, 32, 32, 3)}


def has_convolutions(model: nn.Module, sample: Array | None = None) -> bool:
  """Whether the model computes convolutions (any `flax.linen.Conv`), traced on `sample [N, ...]` (default: an
  image of the model's data set) without computing."""
  from bnjax.lab import registry

  if sample is None:
    dataset = registry.entry(model.model).dataset if isinstance(model, LabModel) else None
    sample = jax.ShapeDtypeStruct(SAMPLE_SHAPES[dataset or 'mnist'], jnp.float32)
  found = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv):
      found.append(True)
    return next_fun(*args, **kwargs)

  def init(x):
    with nn.intercept_methods(record):
      return model.init({'params': jax.random.key(0), 'dropout': jax.random.key(0)}, x, train=False)

  jax.eval_shape(init, sample)
  return bool(found)


# ----------------------------------------------------------------------------
# The registry's models by name.


def names() -> tuple[str, ...]:
  """The registered model names (`bnjax.lab.registry.ENTRIES`)."""
  from bnjax.lab import registry

  return registry.names()


def option_names(name: str) -> tuple[str, ...]:
  """The option names `get(name, ...)` accepts: the lab's options its builder takes, its builder's own
  arguments, and every norm layer option."""
  from bnjax.lab import registry

  takes = registry.builder_arguments(name)
  lab = tuple(option for option in LAB_DEFAULTS if option not in ('model', 'model_options', 'norm_options')
              and (option not in registry.BUILDER_ARGUMENTS or registry.takes(name, option)))
  own = tuple(sorted(arg for arg in takes if arg not in registry.LAB_ARGUMENTS))
  return lab + own + NORM_LAYER_OPTIONS


def defaults(name: str) -> dict:
  """`{'model': the lab options of `get(name)`, 'train': the model's own training settings}`, a fresh dict."""
  from bnjax.lab import registry

  model = get(name)
  values = {key: getattr(model, key) for key in option_names(name) if key in LAB_DEFAULTS and key != 'axis_name'}
  values.update({key: options_lib.OPTIONS[key].default for key in NORM_LAYER_OPTIONS})
  return copy.deepcopy({'model': values, 'train': registry.defaults(name)})


def get(name: str, **overrides) -> LabModel:
  """The Flax module of model `name` (a registry name or an import path), with `overrides`.

  Lab options (`norm`, `activation`, `dropout_placement`, ...) are `LabModel`
  fields; norm layer options (`NORM_LAYER_OPTIONS`: momentum, epsilon, rmax,
  ...) go to its `norm_options`; other names are the builder's own arguments
  (e.g. `layers` of the seed models). The model's own settings
  (`registry.Entry.train`) give the lab options' defaults.

  Raises:
    ValueError: for an unknown name, option or option value, listing the valid ones.
  """
  from bnjax.lab import registry

  entry = registry.resolve(name)
  valid = option_names(name)
  unknown = sorted(set(overrides) - set(valid) - set(LAB_DEFAULTS))  # a lab option its builder lacks: LabModel says
  if unknown:
    raise ValueError(f'{name}: unknown option(s) {unknown}; the options are {list(valid)}.')
  norm_options = dict(overrides.pop('norm_options', {}))
  norm_options.update({key: overrides.pop(key) for key in NORM_LAYER_OPTIONS if key in overrides})
  model_options = dict(overrides.pop('model_options', {}))
  model_options.update({key: overrides.pop(key) for key in list(overrides) if key not in LAB_DEFAULTS})
  own = {key: value for key, value in entry.train.items() if key in LAB_DEFAULTS and key != 'model'}
  model = LabModel(model=name, model_options=flax.core.FrozenDict(model_options),
                   **{**own, **overrides}, norm_options=flax.core.FrozenDict(norm_options))
  build_module(model, model._values(None))  # the builder's own checks (and failures) now, as one line, not mid-training
  return model
