"""A run's configuration: `TrainConfig` (built from the option table), its checks, identity and grouping.

A run is described by one `TrainConfig` (a frozen dataclass: experiments are
data, not code), one field per `bnjax.lab.options.OPTIONS` entry. Everything
here derives from that table and the norm kinds: adding an option or a norm
kind needs no edit in this module.

    config = validate(TrainConfig(norm='renorm', batch_size=32))
    run_id(config)          # stable: survives new options with unchanged defaults
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Iterable

from bnjax.lab import corruption_table, registry
from bnjax.lab.options import NORM_KINDS, OPTIONS, SETTING, VALUE, Option, norm_kind


def _to_dict(self) -> dict[str, Any]:
  return dataclasses.asdict(self)


def _annotation(option: Option):
  return option.type | None if option.optional else option.type


TrainConfig = dataclasses.make_dataclass(
    'TrainConfig',
    [(o.name, _annotation(o), dataclasses.field(default=o.default)) for o in OPTIONS.values()],
    frozen=True,
    namespace={'to_dict': _to_dict, '__module__': __name__,
               '__doc__': 'Every setting of one training run: one field per bnjax.lab.options.OPTIONS entry.'},
)

FIELDS = tuple(OPTIONS)
DEFAULTS = TrainConfig()


def _fail(flag: str, value: Any, expected: str) -> None:
  raise ValueError(f'--{flag}={value!r} is invalid: expected {expected}.')


# ----------------------------------------------------------------------------
# Which options a run uses.


def uses(config, name: str) -> bool:
  """Whether `config`'s run uses option `name` (its norm kind takes it, and its `when` holds)."""
  option = OPTIONS[name]
  if option.norm_option and name not in norm_kind(config.norm).options:
    return False
  return option.when is None or bool(option.when(config))


def has_moving_statistics(config) -> bool:
  """The run's norm layers keep moving statistics (inference uses them)."""
  return norm_kind(config.norm).moving_statistics


def canonical(config):
  """The same run with the options it doesn't use at their defaults, and each value in its one spelling.

  Equal runs compare equal: rmax without renorm, the momentum of an
  inverse-decay schedule, every BN option without BN, a dropout rate without
  dropout are dropped.
  """
  reset = {name: OPTIONS[name].default for name in FIELDS if not uses(config, name)}
  for name, option in OPTIONS.items():
    if option.spelling is not None and name not in reset:
      reset[name] = option.spelling(getattr(config, name))
  return dataclasses.replace(config, **reset)


def model_values(config) -> tuple[str, ...]:
  """The options this run's model takes at call time as plain numbers (`apply(hparams=...)`; vmappable)."""
  return tuple(name for name in vmapped_fields(config) if OPTIONS[name].model_value)


def vmapped_fields(config) -> tuple[str, ...]:
  """The VALUE options lanes of this run's group may differ in (used, and vmappable in this run)."""
  return tuple(
      name for name, option in OPTIONS.items()
      if option.role == VALUE and uses(config, name) and (option.vmap_when is None or option.vmap_when(config))
  )


def _digest(values: dict, length: int) -> str:
  return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:length]


def identity(config) -> dict[str, Any]:
  """What makes a run the run it is: its used options that change results and differ from their defaults.

  Options at their default are left out, so that adding an option (with a
  default that keeps today's behaviour) leaves every existing run's identity,
  and `run_id`, unchanged.
  """
  config = canonical(config)
  return {name: getattr(config, name) for name, option in OPTIONS.items()
          if option.role != SETTING and getattr(config, name) != option.default}


def run_id(config) -> str:
  """12 hex digits of the hash of `identity(config)`."""
  return _digest(identity(config), 12)


def group_key(config) -> str:
  """Runs with equal keys differ only in values: one compiled program trains them together."""
  free = set(vmapped_fields(config))
  return _digest({k: v for k, v in identity(config).items() if k not in free}, 8)


def differing_fields(a, b, ignore: Iterable[str] = ()) -> list[str]:
  """The names of the identity options in which two runs differ (both canonicalized)."""
  left, right = identity(a), identity(b)
  return sorted(name for name in set(left) | set(right)
                if name not in set(ignore) and left.get(name, OPTIONS[name].default) !=
                right.get(name, OPTIONS[name].default))


# ----------------------------------------------------------------------------
# Parsing flag text.


def parse_value(name: str, text: str) -> Any:
  """One flag value, typed after the option: `'0.9'` -> 0.9; 'none' unsets an optional option."""
  if name not in OPTIONS:
    raise ValueError(f'unknown setting --{name}; the settings are {list(FIELDS)}.')
  option = OPTIONS[name]
  item = str(text).strip()
  if option.optional and item.lower() in ('none', ''):
    return None
  if option.type is bool:
    if item.lower() not in ('true', 'false', '1', '0'):
      _fail(name, item, 'true or false')
    return item.lower() in ('true', '1')
  if option.type is int:
    try:
      number = float(item)
    except ValueError:
      number = math.nan
    if not math.isfinite(number) or number != int(number):
      _fail(name, item, 'an integer')
    return int(number)
  if option.type is float:
    try:
      return float(item)
    except ValueError:
      _fail(name, item, 'a number')
  return option.spelling(item) if option.spelling is not None else item


def parse_values(name: str, text: str) -> list:
  """`'0.9,0.99'` -> `[0.9, 0.99]`, each typed after the option."""
  return [parse_value(name, part) for part in str(text).split(',')]


# ----------------------------------------------------------------------------
# Validation.


def validation_fraction(config) -> float | None:
  """The held-out fraction of train, or None when the test set serves as validation."""
  if config.validation == 'test':
    return None
  return float(config.validation)


def _check_option(config, option: Option) -> None:
  value = getattr(config, option.name)
  if value is None:
    if not option.optional:
      _fail(option.name, value, 'a value')
    return
  allowed = option.allowed()
  if allowed is not None and value not in allowed:
    _fail(option.name, value, f'one of {", ".join(map(str, allowed))}')
  if option.type in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
    _fail(option.name, value, 'a number')
  if option.check is not None and not option.check(value):
    _fail(option.name, value, option.expected)


def _check_unused(config, option: Option) -> None:
  """An option given a non-default value that this run doesn't use is a mistake: say who uses it."""
  value = getattr(config, option.name)
  if value == option.default or uses(config, option.name):
    return
  if option.norm_option and option.name not in norm_kind(config.norm).options:
    takers = [k.name for k in NORM_KINDS.values() if option.name in k.options]
    _fail(option.name, value, f'its default with --norm={config.norm} (it is an option of '
          f'{", ".join(f"--norm={k}" for k in takers) or "no norm kind"})')
  if option.builder_arg and not registry.takes(config.model, option.name):
    _fail(option.name, value, f'its default with --model={config.model} (its builder does not take '
          f'{registry.BUILDER_ARGUMENTS[option.name]})')
  _fail(option.name, value, f'its default unless {option.needs} (this run does not use it)')


def _check_norm_widths(config) -> None:
  kind = norm_kind(config.norm)
  if kind.check_width is None:
    return
  options = {name: getattr(config, name) for name in kind.options}
  for width in registry.entry(config.model).widths:
    error = kind.check_width(width, options)
    if error:
      raise ValueError(f'--norm={config.norm} cannot normalize the {width}-feature layers of --model={config.model}: '
                       f'{error}.')


def validate(config):
  """Checks every value and combination; raises ValueError naming the flag. Returns the config."""
  for option in OPTIONS.values():
    _check_option(config, option)
  registry.resolve(config.model)  # an import path imports, its builder is checked: one line naming --model
  for option in OPTIONS.values():
    _check_unused(config, option)
  kind = norm_kind(config.norm)
  for name, expected in kind.required.items():
    if getattr(config, name) is None:
      _fail(name, None, expected)
  if config.validation != 'test':
    try:
      fraction = float(config.validation)
    except ValueError:
      fraction = math.nan
    if not 0.0 < fraction < 1.0:
      _fail('validation', config.validation, "'test' or a fraction of the training set in (0, 1)")
  if config.dropout_placement != 'none' and config.dropout_rate == 0:
    _fail('dropout_rate', config.dropout_rate, f'> 0 with --dropout_placement={config.dropout_placement}')
  if kind.moving_statistics and config.batch_size < 2:
    _fail('batch_size', config.batch_size, f'at least 2 with --norm={config.norm} (the batch statistics of one example '
          'normalize it to 0: the output is the bias and nothing trains); or --norm=group, layer or none')
  if kind.moving_statistics and config.eval_stats == 'batch' and config.eval_batch_size < 2:
    _fail('eval_batch_size', config.eval_batch_size, 'at least 2 with --eval_stats=batch (it is the batch whose '
          'statistics normalize each test example)')
  if kind.moving_statistics and config.virtual_batch_size == 1:
    _fail('virtual_batch_size', 1, 'at least 2 (a ghost batch of one example normalizes it to 0: nothing trains)')
  if uses(config, 'test_batch_size') and config.virtual_batch_size and config.test_batch_size % config.virtual_batch_size:
    _fail('test_batch_size', config.test_batch_size, f'a multiple of --virtual_batch_size={config.virtual_batch_size} '
          '(adaptation normalizes test batches over ghost batches)')
  if config.virtual_batch_size is not None and config.batch_size % config.virtual_batch_size:
    _fail('virtual_batch_size', config.virtual_batch_size, f'a positive divisor of --batch_size={config.batch_size}')
  corruption_table.check(config.dataset, config.corruption, config.severity)
  clean_dataset = corruption_table.CLEAN.get(config.dataset, config.dataset)
  if config.augment and clean_dataset != 'cifar10':
    _fail('augment', config.augment, 'false unless --dataset=cifar10')
  image_dataset = registry.entry(config.model).dataset
  if image_dataset is not None and clean_dataset != image_dataset:
    _fail('model', config.model, f'a model for --dataset={config.dataset} ({config.model} takes {image_dataset} images)')
  _check_norm_widths(config)
  if config.num_devices is not None:
    if config.batch_size % config.num_devices:
      _fail('batch_size', config.batch_size,
            f'a multiple of --num_devices={config.num_devices} (every device takes an equal share of the batch)')
    local_batch = config.batch_size // config.num_devices
    if config.virtual_batch_size is not None and local_batch % config.virtual_batch_size:
      _fail('virtual_batch_size', config.virtual_batch_size,
            f'a divisor of the per-device batch --batch_size / --num_devices = {local_batch} '
            '(ghost batches do not straddle devices)')
  if config.process_id is not None and not 0 <= config.process_id < (config.num_processes or 1 << 30):
    _fail('process_id', config.process_id, f'an integer in [0, --num_processes={config.num_processes})')
  if config.freeze_bn_after is not None and config.steps is None and config.freeze_bn_after >= config.epochs:
    _fail('freeze_bn_after', config.freeze_bn_after, f'fewer than the --epochs={config.epochs} of the run')
  if config.lr_warmup_steps and config.lr_schedule == 'step':
    _fail('lr_warmup_steps', config.lr_warmup_steps, '0 with --lr_schedule=step')
  return config


def unchecked(settings: dict[str, Any] | None = None, *, base=None):
  """A config from `{name: value}` over `base` (default: the defaults), not validated (a sweep's base: its
  grid completes it); unknown names are an error."""
  settings = dict(settings or {})
  unknown = sorted(set(settings) - set(FIELDS))
  if unknown:
    raise ValueError(f'unknown settings {unknown}; the settings are {list(FIELDS)}.')
  return dataclasses.replace(base or DEFAULTS, **settings)


def make(settings: dict[str, Any] | None = None, *, base=None):
  """A validated config from `{name: value}` over `base` (default: the defaults); unknown names are an error."""
  return validate(unchecked(settings, base=base))


def with_model_defaults(settings: dict[str, Any], keep: Iterable[str] = ()) -> dict[str, Any]:
  """`settings` over the model's own training settings (`bnjax.lab.registry.Entry.train`): the run's defaults.

  Every setting given wins. A length given (`steps` or `epochs`) replaces the
  model's other one; a model default that the resulting run does not use (e.g.
  BN momentum with `--norm=group`) is dropped. `keep`: names whose given
  values stand even if not in `settings` (a study's budget).
  """
  given = set(settings) | set(keep)
  own = registry.defaults(settings.get('model', DEFAULTS.model))
  for length, other in (('steps', 'epochs'), ('epochs', 'steps')):
    if length in given:
      own.pop(other, None)
  own = {name: value for name, value in own.items() if name not in given}
  config = unchecked({**own, **settings})
  return {**{name: value for name, value in own.items() if uses(config, name)}, **settings}


def dataset_key(config) -> tuple:
  """The settings that determine the prepared data: runs with equal keys can share one load."""
  return (config.dataset, config.data_source, config.data_dir, config.scaling, config.validation,
          config.validation_seed, config.corruption, config.severity, config.corruption_seed)
