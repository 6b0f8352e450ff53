"""The option table: every setting of a training run and every norm kind, declared once.

Everything else derives from these two tables:
- `bnjax.lab.config.TrainConfig` (one field per option, its type and default);
- validation (choices, ranges, and "only with norm X" from the norm kinds);
- the flags of every CLI and their `--helpfull` text (`bnjax.lab.cli`);
- sweep canonicalization (options a run doesn't use are reset) and grouping
  (*value* options vmap inside one program, *structure* options make groups);
- a run's identity (options that don't change results are left out);
- the model: which layer a norm kind builds and which options it gets, and
  which values the model takes at call time (`model_values`).

Adding a norm kind: its function in the core, its Flax wrapper, and one
`NormKind` entry (`register_norm_kind` does it from user code too). An
option that only a norm kind uses (say `num_groups`) is one `Option` entry
with `norm_option=True`, named in the kind's `options`.

This module is light on purpose (no JAX, no Flax at import): the CLIs parse
and validate flags before the heavy imports, so a bad flag fails at once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

from bnjax.lab import corruption_table

# Roles of an option in a sweep.
VALUE = 'value'  # a number the compiled program takes: runs differing only in values train as one vmapped group
STRUCTURE = 'structure'  # changes the program (shapes, layers, schedules): a separate group
SETTING = 'setting'  # does not change what a run computes (outputs, paths, progress): not part of its identity


@dataclasses.dataclass(frozen=True)
class Option:
  """One setting of a run: a `TrainConfig` field and a flag of the same name.

  Attributes:
    name: field and flag name.
    type: bool, int, float or str.
    default: the default value (None only with `optional`).
    help: the flag's help text.
    group: where it acts: data | model | norm | optimizer | training | output | parallel.
    role: VALUE, STRUCTURE or SETTING (see above).
    optional: None is allowed ("unset").
    choices: the allowed values, or a function returning them (registries).
    check: `value -> bool` for a valid (non-None) value, with `expected`
      describing it for the error message.
    norm_option: used only by the norm kinds that name it in their `options`.
    layer_arg: passed to the norm layer under this name (a norm option that
      only shapes another one, like `momentum_schedule`, is not).
    when: `config -> bool`: used only when this holds (besides the norm kind),
      e.g. `dropout_rate` only with a dropout placement.
    vmap_when: for a VALUE option, `config -> bool`: it is vmappable only when
      this holds (rmax with renorm's warm-up schedule becomes structure).
    model_value: a VALUE the model takes at call time (`apply(hparams=...)`).
    needs: what `when` asks for, in flags (for error messages).
    spelling: `value -> value`, the one spelling of values that mean the same
      (`.30` and `0.3` are one validation fraction, so one run).
    builder_arg: a model option the model's builder must take
      (`bnjax.lab.registry.BUILDER_ARGUMENTS`); unused with a model whose builder doesn't.
  """

  name: str
  type: type
  default: Any
  help: str
  group: str
  role: str = STRUCTURE
  optional: bool = False
  choices: tuple | Callable[[], tuple] | None = None
  check: Callable[[Any], bool] | None = None
  expected: str = ''
  norm_option: bool = False
  layer_arg: bool = False
  when: Callable[[Any], bool] | None = None
  vmap_when: Callable[[Any], bool] | None = None
  model_value: bool = False
  needs: str = ''
  spelling: Callable[[Any], Any] | None = None
  builder_arg: bool = False

  def allowed(self) -> tuple | None:
    return self.choices() if callable(self.choices) else self.choices


@dataclasses.dataclass(frozen=True)
class NormKind:
  """A kind of normalization layer for the study models (`--norm=NAME`).

  Attributes:
    name: the `--norm` value.
    help: one line for `--helpfull`.
    layer: `(options: dict, name: str) -> module` building the Flax layer,
      called as `layer(x, use_running_average)`; `options` holds the kind's
      `layer_arg` options (values, or schedules for momentum/rmax/dmax).
      None: no layer (identity).
    options: the norm options this kind takes (`Option.norm_option`).
    moving_statistics: the layer keeps moving statistics (`batch_stats`) that
      inference uses: the moving-statistics options, evaluation with batch
      statistics and the variance-shift diagnostics apply.
    required: `{option: expected}`: options that must be set (not None).
    check_width: optional `(features: int, options: dict) -> str | None`, an
      error text when the layer can't normalize `features` channels (e.g. a
      group count that doesn't divide them); checked before any data loads.
    cross_device: the layer takes the data-parallel `axis_name` (synchronized statistics).
    layer_types: the import paths (`module:Class`) of the Flax module types of
      this kind's layers: the lab finds norm layers by these types (probes,
      frozen BN, the weight-decay mask), in any model.
  """

  name: str
  help: str
  layer: Callable[[dict, str], Any] | None
  options: tuple[str, ...] = ()
  moving_statistics: bool = False
  required: Mapping[str, str] = dataclasses.field(default_factory=dict)
  check_width: Callable[[int, dict], str | None] | None = None
  cross_device: bool = False
  layer_types: tuple[str, ...] = ()


# ----------------------------------------------------------------------------
# Norm layers (Flax imported when a model is built, not when the table loads).


def _flax_names(options: dict) -> dict:
  """The lab's `center`/`scale` under flax's names, `use_bias`/`use_scale` (epsilon is always given)."""
  renamed = {'center': 'use_bias', 'scale': 'use_scale'}
  return {renamed.get(name, name): value for name, value in options.items()}


def _batch_norm_layer(options: dict, name: str):
  from bnjax import linen

  return linen.BatchNorm(**_flax_names(options), name=name)


def _batch_renorm_layer(options: dict, name: str):
  from bnjax import linen

  return linen.BatchRenorm(**_flax_names(options), name=name)


def _group_norm_layer(options: dict, name: str):
  import flax.linen as nn

  layer = nn.GroupNorm(num_groups=options['num_groups'], epsilon=options['epsilon'], use_bias=options['center'],
                       use_scale=options['scale'], name=name)
  return lambda x, use_running_average: layer(x)


def _layer_norm_layer(options: dict, name: str):
  import flax.linen as nn

  layer = nn.LayerNorm(epsilon=options['epsilon'], use_bias=options['center'], use_scale=options['scale'], name=name)
  return lambda x, use_running_average: layer(x)


def _groups_divide(features: int, options: dict) -> str | None:
  groups = options['num_groups']
  return None if features % groups == 0 else f'--num_groups={groups} does not divide {features}'


MOVING_AVERAGE = ('momentum', 'momentum_schedule', 'momentum_decay_rate', 'momentum_decay_steps', 'momentum_max',
                  'debias', 'update_stats', 'eval_stats', 'precise_bn', 'freeze_bn_after')
AFFINE = ('epsilon', 'center', 'scale')
RENORM = ('renorm_momentum', 'rmax', 'dmax', 'renorm_clipping', 'renorm_warmup_steps', 'rmax_end_step',
          'dmax_end_step')

NORM_KINDS: dict[str, NormKind] = {kind.name: kind for kind in (
    NormKind('none', 'no normalization layer', None),
    NormKind('bn', 'batch normalization (Ioffe & Szegedy 2015)', _batch_norm_layer,
             AFFINE + MOVING_AVERAGE, moving_statistics=True, cross_device=True,
             # flax's own BatchNorm too: a user's model may use it directly.
             layer_types=('bnjax.linen:BatchNorm', 'flax.linen:BatchNorm')),
    NormKind('ghost', 'ghost batch norm (Hoffer et al. 2017): statistics per --virtual_batch_size examples',
             _batch_norm_layer, AFFINE + MOVING_AVERAGE + ('virtual_batch_size',), moving_statistics=True, cross_device=True,
             required={'virtual_batch_size': 'a positive integer with --norm=ghost (the ghost batch size)'},
             layer_types=('bnjax.linen:BatchNorm',)),
    NormKind('renorm', 'batch renormalization (Ioffe 2017); ghost renorm with --virtual_batch_size',
             _batch_renorm_layer, AFFINE + MOVING_AVERAGE + RENORM + ('virtual_batch_size',), moving_statistics=True,
             cross_device=True, layer_types=('bnjax.linen:BatchRenorm',)),
    NormKind('group', 'group normalization (Wu & He 2018, flax.linen.GroupNorm): statistics per example over '
             '--num_groups channel groups', _group_norm_layer, AFFINE + ('num_groups',), check_width=_groups_divide,
             layer_types=('flax.linen:GroupNorm',)),
    NormKind('layer', 'layer normalization (Ba et al. 2016, flax.linen.LayerNorm): statistics per example over '
             'its features', _layer_norm_layer, AFFINE, layer_types=('flax.linen:LayerNorm',)),
)}


def register_norm_kind(kind: NormKind) -> NormKind:
  """Adds a norm kind (e.g. from user code or a test); its options must be declared norm options."""
  unknown = [name for name in kind.options if name not in OPTIONS or not OPTIONS[name].norm_option]
  if unknown:
    raise ValueError(f'norm kind {kind.name!r} names {unknown}, which are not norm options of the table; '
                     f'the norm options are {sorted(n for n, o in OPTIONS.items() if o.norm_option)}.')
  NORM_KINDS[kind.name] = kind
  return kind


def norm_kind(name: str) -> NormKind:
  if name not in NORM_KINDS:
    raise ValueError(f'--norm={name!r} is invalid: expected one of {", ".join(NORM_KINDS)}.')
  return NORM_KINDS[name]


def _builder_takes(option: str) -> Callable[[Any], bool]:
  """`config -> bool`: the run's model builder takes lab option `option` (`bnjax.lab.registry`)."""
  def check(config) -> bool:
    from bnjax.lab import registry

    return registry.takes(config.model, option)
  return check


def _is_model(value) -> bool:
  from bnjax.lab import registry

  return registry.is_model(value)


def _model_expected() -> str:
  from bnjax.lab import registry

  return registry.MODEL_EXPECTED


def _model_help() -> str:
  from bnjax.lab import registry

  return (f'Model: a registered name (bnjax.lab.registry: {", ".join(registry.names())}) or the import path of your '
          'own builder, package.module:function. Its own training settings are the defaults of the other flags.')


def _in(low, high, *, low_open=False, high_open=False):
  def check(value):
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    return math.isfinite(value) and above and below
  return check


_positive = lambda value: value >= 1
_SEED_LIMIT = 2**32 - 1  # JAX's PRNG keys take 32-bit seeds
_seed_range = lambda value: 0 <= value <= _SEED_LIMIT
_non_negative = lambda value: value >= 0
_positive_real = lambda value: math.isfinite(value) and value > 0
_finite_non_negative = lambda value: math.isfinite(value) and value >= 0
_constant_momentum = lambda c: c.momentum_schedule == 'constant'
_inverse_decay = lambda c: c.momentum_schedule == 'inverse_decay'
_warmup_clipping = lambda c: c.renorm_clipping == 'warmup'
_constant_clipping = lambda c: c.renorm_clipping == 'constant'
_with_dropout = lambda c: c.dropout_placement != 'none'
_corrupted = lambda c: corruption_table.is_corrupted(c.dataset)
# The data sets of `bnjax.lab.data.sources.SPECS` (which imports JAX: tests/test_lab.py checks the two agree).
CLEAN_DATASETS = ('mnist', 'fashion_mnist', 'cifar10')
_CORRUPTED = ' or '.join(corruption_table.CLEAN)
# Test-time adaptation methods (bnjax.lab.adaptation): name -> what it does.
ADAPT_METHODS = {
    'source': 'moving statistics',
    'prediction_bn': 'each test batch normalized by its own statistics',
    'prior': 'Schneider et al.: source and batch statistics mixed with weight N / (N + n)',
    'adabn': 'population statistics re-estimated on the test split',
    'tent': 'entropy minimisation on the norm scale and bias, online',
}
# Methods are separated by ',' (or '+', which a sweep's comma lists leave alone: --adapt=source+tent).
adapt_methods = lambda text: tuple(m.strip() for m in str(text).replace('+', ',').split(','))
_methods = lambda c: adapt_methods(c.adapt)
_adapt_methods = lambda value: all(m in ADAPT_METHODS for m in adapt_methods(value))
_adapting = lambda c: any(m != 'source' for m in _methods(c))
_tenting = lambda c: 'tent' in _methods(c)
_MOMENTUM_EXPECTED = 'a number in [0, 1] (BN momentum is the weight of the old average)'


def _validation_spelling(value):
  """'test', or the fraction as Python writes the float ('.30' -> '0.3'); other text is left for validation."""
  try:
    return value if value == 'test' else repr(float(value))
  except (TypeError, ValueError):
    return value


def _o(*args, **kwargs) -> Option:
  return Option(*args, **kwargs)


OPTIONS: dict[str, Option] = {option.name: option for option in (
    # Data.
    _o('dataset', str, 'mnist', f'Data set; {_CORRUPTED}: trained on the clean train split, '
       'tested on --corruption at --severity (MNIST-C, CIFAR-10-C; see bnjax.lab.corruption_table).', 'data',
       choices=CLEAN_DATASETS + tuple(corruption_table.CLEAN)),
    _o('corruption', str, None, 'The corruption of the test split of a *_corrupted data set (e.g. gaussian_noise).',
       'data', optional=True, when=_corrupted, needs=f'--dataset={_CORRUPTED}'),
    _o('severity', int, 5, 'Severity 1..5 of --corruption (the published tables).', 'data', when=_corrupted,
       needs=f'--dataset={_CORRUPTED}'),
    _o('corruption_seed', int, 0, 'Seed of the generated corruption (image i draws from fold_in(seed, i)).', 'data',
       when=_corrupted, needs=f'--dataset={_CORRUPTED}'),
    _o('data_source', str, 'auto', 'auto: local files when found (--data_dir, $BNJAX_DATA_DIR, well-known places), '
       'else TFDS.', 'data', role=SETTING, choices=('auto', 'files', 'tfds')),
    _o('data_dir', str, None, 'Folder with the canonical files (e.g. ../shared/data), or TFDS data_dir.', 'data',
       role=SETTING, optional=True),
    _o('scaling', str, 'unit', 'unit: pixels / 255; standardize: per-channel mean/std of the training split.', 'data',
       choices=('unit', 'standardize')),
    _o('validation', str, 'test', "'test': the test set is the validation set; a fraction (e.g. 0.3) holds out that "
       'part of train.', 'data', spelling=_validation_spelling),
    _o('validation_seed', int, 777, 'Seed of the held-out split (the source: 777).', 'data', check=_seed_range,
       expected=f'an integer in [0, {_SEED_LIMIT}]',
       when=lambda c: c.validation != 'test', needs='--validation=<fraction>'),
    _o('augment', bool, False, 'CIFAR-10 augmentation on device: random crop with 4-pixel padding, horizontal flip.',
       'data'),
    # Model.
    _o('model', str, 'mnist_mlp', _model_help(), 'model', check=_is_model, expected=_model_expected()),
    _o('norm', str, 'bn', 'Norm kind: ' + '; '.join(f'{k.name}: {k.help}' for k in NORM_KINDS.values()) + '.',
       'model', choices=lambda: tuple(NORM_KINDS)),
    _o('conv_impl', str, 'xla', "Convolution layers: xla (flax.linen.Conv, nn.max_pool); cpu_fast (bnjax.lab.conv: "
       'on CPU the 3x3 kernel gradient summed over 8-image slices and max pooling over strided slices, measured '
       '2.1x faster per CNN step at batch 256; equal values to float tolerance, so not the default: reproductions '
       'keep their numbers).', 'model', choices=('xla', 'cpu_fast'), when=_builder_takes('conv_impl'),
       needs='a --model whose builder takes conv_impl', builder_arg=True),
    _o('activation', str, 'relu', 'Activation of every block.', 'model', choices=('relu', 'swish', 'sigmoid'),
       when=_builder_takes('activation'), needs='a --model whose builder takes activation', builder_arg=True),
    _o('norm_position', str, 'before_activation', 'Norm before (Dense -> BN -> act) or after the activation '
       '(Dense -> act -> BN).', 'model', choices=('before_activation', 'after_activation'),
       when=_builder_takes('norm_position'), needs='a --model whose builder takes norm_position', builder_arg=True),
    _o('dropout_placement', str, 'none', 'none | before_norm (dropout feeds BN: variance shift) | after_norm (every '
       'block) | end (after the last BN).', 'model', choices=('none', 'before_norm', 'after_norm', 'end'),
       when=_builder_takes('dropout_placement'), needs='a --model whose builder takes dropout_placement',
       builder_arg=True),
    _o('dropout_rate', float, 0.0, 'Dropout rate in [0, 1).', 'model', role=VALUE, check=_in(0.0, 1.0, high_open=True),
       expected='a number in [0, 1)', when=_with_dropout, model_value=True,
       needs='a --dropout_placement other than none'),
    # Norm layers: which kinds use each is said by NORM_KINDS.
    _o('center', bool, True, 'Learn the norm shift beta (the source: can be off after the activation).', 'norm',
       norm_option=True, layer_arg=True),
    _o('scale', bool, True, 'Learn the norm scale gamma (the source: can be off after the activation).', 'norm',
       norm_option=True, layer_arg=True),
    _o('epsilon', float, 1e-3, 'Norm epsilon added to the variance.', 'norm', check=_positive_real,
       expected='a number > 0', norm_option=True, layer_arg=True),
    _o('momentum', float, 0.99, 'BN momentum, weight of the old moving average (Keras/Flax; PyTorch 0.1 = 0.9 here).',
       'norm', role=VALUE, check=_in(0.0, 1.0), expected=_MOMENTUM_EXPECTED, norm_option=True, layer_arg=True,
       when=_constant_momentum, model_value=True, needs='--momentum_schedule=constant'),
    _o('momentum_schedule', str, 'constant', 'constant, or inverse_decay: 1 - decay_rate ** (step / decay_steps) '
       '(the source, large batches).', 'norm', choices=('constant', 'inverse_decay'), norm_option=True),
    _o('momentum_decay_rate', float, 0.8, 'Base of the inverse-decay momentum schedule.', 'norm',
       check=_in(0.0, 1.0, low_open=True, high_open=True), expected='a number in (0, 1)', norm_option=True,
       when=_inverse_decay, needs='--momentum_schedule=inverse_decay'),
    _o('momentum_decay_steps', float, 10.0, 'Steps over which 1 - momentum shrinks by decay_rate.', 'norm',
       check=_positive_real, expected='a number > 0', norm_option=True, when=_inverse_decay,
       needs='--momentum_schedule=inverse_decay'),
    _o('momentum_max', float, None, 'Cap of the inverse-decay momentum (unset: none; it then reaches 1.0 and '
       'freezes).', 'norm', optional=True, check=_in(0.0, 1.0), expected='a number in [0, 1]', norm_option=True,
       when=_inverse_decay, needs='--momentum_schedule=inverse_decay'),
    _o('debias', bool, False, 'Zero-debias the BN moving averages (Adam-style correction of the initial value).',
       'norm', norm_option=True, layer_arg=True),
    _o('renorm_momentum', float, 0.99, 'Batch renorm: momentum of the mu/sigma used for r and d.', 'norm', role=VALUE,
       check=_in(0.0, 1.0), expected=_MOMENTUM_EXPECTED, norm_option=True, layer_arg=True, model_value=True),
    _o('rmax', float, 3.0, 'Batch renorm: r is clipped to [1/rmax, rmax] (final value with '
       '--renorm_clipping=warmup).', 'norm', role=VALUE, check=lambda v: math.isfinite(v) and v >= 1,
       expected='a number >= 1', norm_option=True, layer_arg=True, vmap_when=_constant_clipping, model_value=True),
    _o('dmax', float, 5.0, 'Batch renorm: d is clipped to [-dmax, dmax] (final value with --renorm_clipping=warmup).',
       'norm', role=VALUE, check=_finite_non_negative, expected='a number >= 0', norm_option=True, layer_arg=True,
       vmap_when=_constant_clipping, model_value=True),
    _o('renorm_clipping', str, 'constant', "constant, or warmup: the paper's rmax 1 -> rmax, dmax 0 -> dmax after a "
       'warm-up.', 'norm', choices=('constant', 'warmup'), norm_option=True),
    _o('renorm_warmup_steps', int, 5000, 'Batch renorm warm-up: steps of plain BN before relaxing rmax/dmax.', 'norm',
       check=_non_negative, expected='an integer >= 0', norm_option=True, when=_warmup_clipping,
       needs='--renorm_clipping=warmup'),
    _o('rmax_end_step', int, 40000, 'Batch renorm warm-up: step at which rmax reaches --rmax.', 'norm',
       check=_non_negative, expected='an integer >= 0', norm_option=True, when=_warmup_clipping,
       needs='--renorm_clipping=warmup'),
    _o('dmax_end_step', int, 25000, 'Batch renorm warm-up: step at which dmax reaches --dmax.', 'norm',
       check=_non_negative, expected='an integer >= 0', norm_option=True, when=_warmup_clipping,
       needs='--renorm_clipping=warmup'),
    _o('virtual_batch_size', int, None, 'Ghost batch size: BN statistics per group of this many examples.', 'norm',
       optional=True, check=_positive, expected='a positive integer', norm_option=True, layer_arg=True),
    _o('num_groups', int, 32, 'Group norm: channel groups (must divide every layer width).', 'norm',
       check=_positive, expected='a positive integer', norm_option=True, layer_arg=True),
    _o('update_stats', bool, True, 'Keep the updated moving statistics (false: the classic bug, evaluation then '
       'fails).', 'norm', norm_option=True),
    _o('eval_stats', str, 'moving', "moving: evaluate with the moving statistics (correct); batch: with each test "
       "batch's own.", 'norm', choices=('moving', 'batch'), norm_option=True),
    _o('precise_bn', int, 0, 'Precise BN (Wu & Johnson 2021): before every evaluation, recompute the population '
       'statistics of every BN layer from this many training examples under the fixed weights (training-mode '
       'passes, dropout off); validation then uses them and the summary adds test accuracy with them. 0: off.',
       'norm', check=_non_negative, expected='a number of examples >= 0 (0: off)', norm_option=True),
    _o('freeze_bn_after', int, None, 'Frozen BN (Wu & Johnson 2021): after this many epochs the BN layers normalize '
       'with their moving statistics in training too and stop updating them (with --precise_bn: with the precise '
       'statistics). Unset: never.', 'norm', optional=True, check=_positive,
       expected='a positive number of epochs (or unset)', norm_option=True),
    # Optimization.
    _o('optimizer', str, 'adam', 'adam (adamw with --weight_decay) | sgd | momentum.', 'optimizer',
       choices=('adam', 'sgd', 'momentum')),
    _o('learning_rate', float, 1e-3, 'Peak learning rate.', 'optimizer', role=VALUE, check=_positive_real,
       expected='a finite number > 0'),
    _o('optimizer_momentum', float, 0.9, 'Momentum of --optimizer=momentum (not BN momentum).', 'optimizer',
       check=_in(0.0, 1.0), expected='a number in [0, 1]', when=lambda c: c.optimizer == 'momentum',
       needs='--optimizer=momentum'),
    _o('weight_decay', float, 0.0, 'Weight decay: decoupled (AdamW) with --optimizer=adam, added to the gradient '
       '(L2, as He et al.) with sgd and momentum.', 'optimizer', check=_finite_non_negative,
       expected='a finite number >= 0'),
    _o('norm_weight_decay', bool, True, "Whether weight decay applies to the norm layers' scale and bias too "
       "(false: they are masked out, as flax's ImageNet example and timm do; the norm layers are found by their "
       'module type).', 'optimizer', when=lambda c: c.weight_decay > 0, needs='--weight_decay > 0'),
    _o('lr_schedule', str, 'constant', 'constant | cosine (to 0) | step (x0.1 at 50% and 75% of training).',
       'optimizer', choices=('constant', 'cosine', 'step')),
    _o('lr_warmup_steps', int, 0, 'Linear learning-rate warm-up steps.', 'optimizer', check=_non_negative,
       expected='an integer >= 0'),
    # Training.
    _o('batch_size', int, 500, 'Training batch size (the last partial batch of an epoch is dropped).', 'training',
       check=_positive, expected='a positive integer'),
    _o('epochs', int, 20, 'Training epochs.', 'training', check=_positive, expected='a positive integer',
       when=lambda c: c.steps is None, needs='--steps unset'),
    _o('steps', int, None, 'Training steps; overrides --epochs when set.', 'training', optional=True, check=_positive,
       expected='a positive integer (or unset to use --epochs)'),
    _o('eval_batch_size', int, 1000, "Evaluation batch size (with --eval_stats=batch it sets the statistics' batch).",
       'training', check=_positive, expected='a positive integer'),
    _o('seed', int, 0, 'Random seed: initialization, shuffling, dropout.', 'training', role=VALUE,
       check=_seed_range, expected=f'an integer in [0, {_SEED_LIMIT}]'),
    # Test-time adaptation, evaluated after training (bnjax.lab.adaptation; it does not change the training).
    _o('adapt', str, 'source', 'Test-time adaptation methods evaluated on the test split after training, '
       'comma-separated: ' + ', '.join(f'{name} ({what})' for name, what in ADAPT_METHODS.items()) +
       "; '+' separates them too (in a sweep's comma lists). Their test errors go into summary.json as "
       'test_error_<method>.', 'adapt', role=SETTING,
       check=_adapt_methods, expected=f'comma-separated items of {", ".join(ADAPT_METHODS)}'),
    _o('test_batch_size', int, 200, 'Test batch size of the adaptation methods (TENT on CIFAR-10-C: 200); the '
       'last partial batch is left out.', 'adapt', role=SETTING, check=_positive, expected='a positive integer',
       when=_adapting, needs='--adapt with a method other than source'),
    _o('adapt_prior_n', float, 16.0, "The prior's N: the source statistics weigh N / (N + test_batch_size).",
       'adapt', role=SETTING, check=_finite_non_negative, expected='a finite number >= 0',
       when=lambda c: 'prior' in _methods(c), needs='--adapt with prior'),
    _o('tent_optimizer', str, 'adam', 'TENT optimizer: adam (the CIFAR setting) or sgd (momentum 0.9).', 'adapt',
       role=SETTING, choices=('adam', 'sgd'), when=_tenting, needs='--adapt with tent'),
    _o('tent_lr', float, 1e-3, 'TENT learning rate.', 'adapt', role=SETTING, check=_positive_real,
       expected='a number > 0', when=_tenting, needs='--adapt with tent'),
    _o('tent_steps', int, 1, 'TENT steps per test batch.', 'adapt', role=SETTING, check=_positive,
       expected='a positive integer', when=_tenting, needs='--adapt with tent'),
    _o('tent_episodic', bool, False, 'TENT resets to the source model before every batch (else continual).',
       'adapt', role=SETTING, when=_tenting, needs='--adapt with tent'),
    # Outputs and how the loop runs (no effect on the numbers).
    _o('workdir', str, None, 'Output folder (default: runs/<name>-<time>).', 'output', role=SETTING, optional=True),
    _o('checkpoint_every', int, 1, 'Checkpoint every this many epochs (0: never).', 'output', role=SETTING,
       check=_non_negative, expected='an integer >= 0'),
    _o('test_batch_stats', bool, True, 'At the end of a run, also test with batch statistics '
       '(test_accuracy_batch_stats, stats_gap; only norms with moving statistics have them); false saves that pass '
       'over the test set.', 'output', role=SETTING),
    _o('variance_probes', bool, True, "At the end of a run, measure each norm layer's input variance in training "
       "vs inference mode (dropout's variance shift) and moving vs inference variance; false skips the probes.",
       'output', role=SETTING),
    _o('progress_updates', int, 10, 'Progress-bar refreshes (and divergence checks) per epoch.', 'output',
       role=SETTING, check=_non_negative, expected='an integer >= 0'),
    _o('step_loop', str, 'auto', 'scan: each epoch is a few jitted lax.scans of steps; python: one jitted step per '
       'call (XLA:CPU runs convolutions inside a scan ~30x slower); auto: python for conv models on CPU.', 'output',
       role=SETTING, choices=('auto', 'scan', 'python')),
    # Data parallelism (bnjax.lab.parallel).
    _o('num_devices', int, None, 'Data-parallel devices (unset: every device of every process; 1: one device). '
       '--batch_size is the global batch and must be a multiple of it.', 'parallel', role=SETTING, optional=True,
       check=_positive, expected='a positive integer (or unset for every device)'),
    _o('cross_device_stats', str, 'sync', 'With several devices: sync: BN statistics of the whole global batch; '
       'local: each device normalizes its own shard (ghost BN with the per-device batch; moving statistics pooled).',
       'parallel', choices=('sync', 'local')),
    _o('coordinator_address', str, None, 'Multi-process: host:port of process 0 (else $JAX_COORDINATOR_ADDRESS); '
       'auto: let JAX detect the cluster (Cloud TPU pod slice, SLURM, Open MPI).', 'parallel', role=SETTING,
       optional=True),
    _o('num_processes', int, None, 'Multi-process: number of processes (else $JAX_NUM_PROCESSES).', 'parallel',
       role=SETTING, optional=True, check=_positive, expected='a positive integer'),
    _o('process_id', int, None, "Multi-process: this process's id in [0, num_processes) (else $JAX_PROCESS_ID).",
       'parallel', role=SETTING, optional=True, check=_non_negative, expected='an integer >= 0'),
)}

NAMES = tuple(OPTIONS)
