"""The study models: one registry of named Flax modules and their default hyperparameters.

    model = bnjax.lab.models.get('mlp_seed', norm='bn', dropout_placement='end')
    variables = model.init(key, x)                       # {'params', 'batch_stats'}
    logits, updates = model.apply(variables, x, train=True, rngs={'dropout': key},
                                  mutable=['batch_stats'])
    logits = model.apply({**variables, **updates}, x)    # evaluation

Every model is a `Net`: a stack of *norm blocks* (a Dense or 3x3 Conv layer,
its normalization and its activation, in the order `norm_position` says),
with flatten and max-pool steps between them, and a Dense classifier `head`.
The output is logits: the softmax belongs to the loss.

Models (`names()`; `defaults(name)` gives the options and the source's
training hyperparameters):
- `mlp_seed`: the MNIST MLP of the source: Flatten -> 6 blocks of Dense 256,
  128, 512, 64, 128, 256 -> Dense 10. 376,650 parameters without norm;
  with BN 379,338 + 2,688 moving statistics (Keras's counts).
- `cnn_seed`: the CIFAR-10 CNN: [Conv 32 block x2 -> MaxPool 2], the same
  with 64 and 128 channels, Flatten -> Dense 256 block -> Dense 10. With BN
  815,530 + 1,408 moving statistics (Keras's counts).
- `mlp_bn_paper`: Ioffe & Szegedy 2015, section 4.1: Flatten -> 3 blocks of
  Dense 100 with sigmoid -> Dense 10.

Linear layers keep their bias even before BN (Keras's default: the counts
above include them) and are initialised as in Keras (`glorot_uniform`
weights, zero biases) unless `kernel_init` says otherwise.

Options (fields of `Net`; `get` checks them):
- structure: `norm` none | bn | renorm | ghost (ghost needs
  `virtual_batch_size`; renorm may have one too: ghost renorm), `activation`
  relu | swish | sigmoid, `norm_position` before_activation | after_activation,
  `dropout_placement` (below), `layers` (the architecture), `num_classes`,
  `kernel_init`.
- norm options, given to every norm layer (`bnjax.linen`): `momentum`,
  `epsilon`, `renorm_momentum`, `rmax`, `dmax`, `virtual_batch_size`,
  `center`, `scale` (turn off after the activation, as the source suggests),
  `debias`, `axis_name`.
- `dropout_rate`.

Dropout placements (with norm='none' dropout stands at the same places, so
runs with and without BN compare fairly); per block:
- `none`: no dropout.
- `before_norm`: dropout feeds every norm layer (the harmful case of Li et al.
  2019): Dense -> Dropout -> Norm -> Act, or Dense -> Act -> Dropout -> Norm.
- `after_norm`: dropout ends every block: Dense -> Norm -> Act -> Dropout, or
  Dense -> Act -> Norm -> Dropout.
- `end`: once, after the last block, before the classifier (the source's advice).

Hyperparameter values. The values a sweep varies, `HPARAMS` = momentum,
renorm_momentum, rmax, dmax, dropout_rate, are fields too (numbers, arrays or
schedules), and `apply(..., hparams={...})` overrides them at call time with
numbers or arrays. Under `jax.vmap` over both the variables and `hparams`,
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
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnjax import moments as moments_lib
from bnjax.lab import architectures
from bnjax.lab import conv as conv_lib
from bnjax.lab import options as options_lib

Array = jnp.ndarray

ACTIVATIONS = {'relu': nn.relu, 'swish': nn.swish, 'sigmoid': nn.sigmoid}
NORM_POSITIONS = ('before_activation', 'after_activation')
DROPOUT_PLACEMENTS = ('none', 'before_norm', 'after_norm', 'end')
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
# The module.


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
  return value is default or (isinstance(value, (int, float, bool, np.number)) and value == default)


def _is_zero(value) -> bool:
  """True only for a concrete 0 (a traced rate may be anything)."""
  return isinstance(value, (int, float, np.number)) and value == 0


class Net(nn.Module):
  """Norm blocks and a Dense classifier; see the module docstring for every option.

  Call: `logits = Net(...)(x, train=False, *, hparams=None, probe_unit=0)`.
  x: `[N, ...]` images (`[N, 28, 28(, 1)]` for the MLPs, flattened;
  `[N, 32, 32, 3]` for the CNN); logits `[N, num_classes]` (no softmax:
  the loss applies it, e.g. `optax.softmax_cross_entropy`). `train=True`
  uses batch statistics (`batch_stats` must be mutable) and dropout (rng
  collection 'dropout'). `hparams`: values that override the options named in
  `HPARAMS`. `probe_unit`: the unit whose percentiles the probes take.
  `freeze_norm=True` (with `train`): frozen BN (Wu & Johnson 2021): the norm
  layers normalize with their moving statistics and leave them unchanged,
  while dropout still trains.

  The norm layer comes from the norm kind's table entry
  (`bnjax.lab.options.NORM_KINDS`); `norm_options` holds the norm options
  given (numbers, arrays or schedules), the table's defaults fill the rest.
  """

  layers: tuple
  num_classes: int = 10
  norm: str = 'bn'
  activation: str = 'relu'
  norm_position: str = 'before_activation'
  dropout_placement: str = 'none'
  dropout_rate: float = 0.5
  kernel_init: str = 'glorot_uniform'
  conv_impl: str = 'xla'
  norm_options: Mapping[str, Any] = flax.core.FrozenDict()
  axis_name: Any = None

  def __post_init__(self):
    _check_layers(self.layers)
    _check_choice('norm', self.norm, tuple(options_lib.NORM_KINDS))
    _check_choice('activation', self.activation, tuple(ACTIVATIONS))
    _check_choice('norm_position', self.norm_position, NORM_POSITIONS)
    _check_choice('dropout_placement', self.dropout_placement, DROPOUT_PLACEMENTS)
    _check_choice('kernel_init', self.kernel_init, tuple(KERNEL_INITS))
    _check_choice('conv_impl', self.conv_impl, ('xla', 'cpu_fast'))
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

  def _norm_layer(self, values: dict, name: str) -> Callable[[Array, bool], Array]:
    kind = options_lib.NORM_KINDS[self.norm]
    if kind.layer is None:
      return lambda x, use_running_average: x
    layer_options = {
        option: values.get(option, options_lib.OPTIONS[option].default)
        for option in kind.options if options_lib.OPTIONS[option].layer_arg
    }
    if kind.cross_device:
      layer_options['axis_name'] = self.axis_name
    return kind.layer(layer_options, name)

  def _dropout(self, x: Array, train: bool, rate) -> Array:
    if not train or _is_zero(rate):
      return x
    return dropout(x, rate, self.make_rng('dropout'))

  def _block(self, index, step, x, train, values, probe_unit, freeze_norm=False) -> Array:
    """Linear -> [dropout] -> norm -> activation (or linear -> activation -> [dropout] -> norm) -> [dropout]."""
    kind, features = step
    kernel_init = KERNEL_INITS[self.kernel_init]
    if kind == 'dense':
      linear = nn.Dense(features, kernel_init=kernel_init, name=f'linear_{index}')
    else:
      conv = conv_lib.Conv if self.conv_impl == 'cpu_fast' else nn.Conv
      linear = conv(features, (3, 3), padding='SAME', kernel_init=kernel_init, name=f'linear_{index}')
    norm = self._norm_layer(values, f'norm_{index}')
    activation = ACTIVATIONS[self.activation]
    probes = {}
    x = linear(x)
    order = ('norm', 'activation') if self.norm_position == 'before_activation' else ('activation', 'norm')
    for stage in order:
      if stage == 'norm':
        if self.dropout_placement == 'before_norm':
          x = self._dropout(x, train, values['dropout_rate'])
        probes['norm_input'] = x
        x = norm(x, not train or freeze_norm)
      else:
        probes['activation_input'] = x
        x = activation(x)
    if self.dropout_placement == 'after_norm':
      x = self._dropout(x, train, values['dropout_rate'])
    if self.is_mutable_collection('probes') and not self.is_initializing():
      self.sow(
          'probes', f'block_{index}',
          {site: probe_statistics(value, probe_unit) for site, value in probes.items()},
          init_fn=dict, reduce_fn=lambda _, new: new,
      )
    return x

  @nn.compact
  def __call__(
      self, x: Array, train: bool = False, *, hparams: Mapping | None = None, probe_unit: int = 0,
      freeze_norm: bool = False,
  ) -> Array:
    values = self._values(hparams)
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
        x = self._block(index, tuple(step), x, train, values, probe_unit, freeze_norm)
        index += 1
        if index == num_blocks and self.dropout_placement == 'end':
          x = self._dropout(x, train, values['dropout_rate'])
    return nn.Dense(self.num_classes, kernel_init=KERNEL_INITS[self.kernel_init], name='head')(x)


# ----------------------------------------------------------------------------
# The registry (`bnjax.lab.architectures`) as Flax modules.


def has_convolutions(model: nn.Module) -> bool:
  """Whether a `Net` (or any module with a `layers` tuple of steps) has convolution steps."""
  return architectures.has_convolutions(getattr(model, 'layers', ()))


def names() -> tuple[str, ...]:
  """The registered model names (their old names are accepted too: `architectures.ALIASES`)."""
  return architectures.names()


def option_names(name: str) -> tuple[str, ...]:
  """The option names `get(name, ...)` accepts: `Net`'s fields and every norm layer option."""
  architectures.get(name)
  fields = tuple(f.name for f in dataclasses.fields(Net) if f.init and f.name not in ('parent', 'name', 'norm_options'))
  return fields + NORM_LAYER_OPTIONS


def defaults(name: str) -> dict:
  """`{'model': every option of `get(name)`, 'train': the source's training hyperparameters}`, a fresh plain dict."""
  arch = architectures.get(name)
  model = get(name)
  values = {key: getattr(model, key) for key in option_names(name) if key not in NORM_LAYER_OPTIONS}
  values.update({key: options_lib.OPTIONS[key].default for key in NORM_LAYER_OPTIONS})
  return copy.deepcopy({'model': values, 'train': arch.train})


def get(name: str, **overrides) -> nn.Module:
  """The Flax module of model `name` (or an old name), its default options updated with `overrides`.

  Norm layer options (`NORM_LAYER_OPTIONS`: momentum, epsilon, rmax, ...)
  may be given directly; they go to `Net.norm_options`.

  Raises:
    ValueError: for an unknown name, option or option value, listing the valid ones.
  """
  arch = architectures.get(name)
  valid = option_names(name)
  unknown = sorted(set(overrides) - set(valid) - {'norm_options'})
  if unknown:
    raise ValueError(f'{name}: unknown option(s) {unknown}; the options are {list(valid)}.')
  norm_options = dict(overrides.pop('norm_options', {}))
  norm_options.update({key: overrides.pop(key) for key in NORM_LAYER_OPTIONS if key in overrides})
  return Net(**{'layers': arch.layers, **arch.options, **overrides, 'norm_options': flax.core.FrozenDict(norm_options)})
