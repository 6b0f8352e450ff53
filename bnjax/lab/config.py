"""Experiment configuration: every hyperparameter of a training run, its checks, and the presets.

A run is described by one `TrainConfig` (a frozen dataclass: experiments are
data, not code). `experiments/train.py` builds it from flags (one flag per
field, same name), sweeps build many by `dataclasses.replace`. Presets are
named overrides of the defaults; flags given beside a preset override it.

    config = resolve(preset='seed000', overrides={'epochs': 1})
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

Choice = tuple[str, ...]

CHOICES: dict[str, Choice] = {
    'dataset': ('mnist', 'fashion_mnist', 'cifar10'),
    'data_source': ('auto', 'files', 'tfds'),
    'scaling': ('unit', 'standardize'),
    'model': ('mlp_seed', 'cnn_seed', 'mlp_bn_paper'),
    'norm': ('none', 'bn', 'renorm', 'ghost'),
    'momentum_schedule': ('constant', 'inverse_decay'),
    'renorm_clipping': ('constant', 'warmup'),
    'dropout_placement': ('none', 'before_norm', 'after_norm', 'end'),
    'activation': ('relu', 'swish', 'sigmoid'),
    'norm_position': ('before_activation', 'after_activation'),
    'optimizer': ('adam', 'sgd', 'momentum'),
    'lr_schedule': ('constant', 'cosine', 'step'),
    'eval_stats': ('moving', 'batch'),
    'step_loop': ('auto', 'scan', 'python'),
    'cross_device_stats': ('sync', 'local'),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every hyperparameter of one training run; the flags of experiments/train.py have these names."""

  # Data.
  dataset: str = 'mnist'
  data_source: str = 'auto'
  data_dir: str | None = None
  scaling: str = 'unit'  # unit: /255; standardize: per-channel mean/std of the training split
  validation: str = 'test'  # 'test' (the test set as validation) or a fraction of train, e.g. '0.3'
  validation_seed: int = 777
  augment: bool = False  # CIFAR-10: random crop (4-pixel padding) and horizontal flip, on device
  # Model.
  model: str = 'mlp_seed'
  norm: str = 'bn'
  activation: str = 'relu'
  norm_position: str = 'before_activation'
  center: bool = True
  scale: bool = True
  dropout_placement: str = 'none'
  dropout_rate: float = 0.0
  # Batch norm.
  momentum: float = 0.99
  momentum_schedule: str = 'constant'  # inverse_decay: 1 - decay_rate ** (step / decay_steps)
  momentum_decay_rate: float = 0.8
  momentum_decay_steps: float = 10.0
  momentum_max: float | None = None  # cap for inverse_decay
  epsilon: float = 1e-3
  debias: bool = False
  renorm_momentum: float = 0.99
  rmax: float = 3.0
  dmax: float = 5.0
  renorm_clipping: str = 'constant'  # warmup: the paper's schedule, 1 -> rmax, 0 -> dmax
  renorm_warmup_steps: int = 5000
  rmax_end_step: int = 40000
  dmax_end_step: int = 25000
  virtual_batch_size: int | None = None
  update_stats: bool = True  # False: the classic bug, moving statistics never updated
  eval_stats: str = 'moving'  # batch: evaluate with each test batch's own statistics
  # Optimization.
  optimizer: str = 'adam'
  learning_rate: float = 1e-3
  optimizer_momentum: float = 0.9  # for optimizer=momentum (heavy ball)
  weight_decay: float = 0.0
  lr_schedule: str = 'constant'
  lr_warmup_steps: int = 0
  batch_size: int = 500
  epochs: int = 20
  steps: int | None = None  # total training steps; overrides epochs (the last epoch may be partial)
  eval_batch_size: int = 1000
  seed: int = 0
  # Outputs.
  workdir: str | None = None
  checkpoint_every: int = 1  # epochs; 0: no checkpoints
  progress_updates: int = 10  # progress-bar refreshes (and divergence checks) per epoch
  step_loop: str = 'auto'  # scan: an epoch is a few jitted scans; python: one jitted step per call
  # Data parallelism (bnjax.lab.parallel).
  num_devices: int | None = None  # None: every device of every process; 1: the single-device path
  cross_device_stats: str = 'sync'  # sync: BN over the global batch; local: over each device's shard
  coordinator_address: str | None = None  # multi-process: host:port of process 0, or 'auto' (TPU pod, SLURM)
  num_processes: int | None = None  # None: $JAX_NUM_PROCESSES, else one process
  process_id: int | None = None  # None: $JAX_PROCESS_ID

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def _fail(flag: str, value: Any, expected: str) -> None:
  raise ValueError(f'--{flag}={value!r} is invalid: expected {expected}.')


def validation_fraction(config: TrainConfig) -> float | None:
  """The held-out fraction of train, or None when the test set serves as validation."""
  if config.validation == 'test':
    return None
  return float(config.validation)


def validate(config: TrainConfig) -> TrainConfig:
  """Checks every value and combination; raises ValueError naming the flag. Returns the config."""
  for name, choices in CHOICES.items():
    value = getattr(config, name)
    if value not in choices:
      _fail(name, value, f'one of {", ".join(choices)}')
  if config.validation != 'test':
    try:
      fraction = float(config.validation)
    except ValueError:
      fraction = math.nan
    if not 0.0 < fraction < 1.0:
      _fail('validation', config.validation, "'test' or a fraction of the training set in (0, 1)")
  for name in ('batch_size', 'epochs', 'eval_batch_size'):
    if getattr(config, name) < 1:
      _fail(name, getattr(config, name), 'a positive integer')
  if config.steps is not None and config.steps < 1:
    _fail('steps', config.steps, 'a positive integer (or unset to use --epochs)')
  for name in ('checkpoint_every', 'lr_warmup_steps', 'renorm_warmup_steps', 'progress_updates'):
    if getattr(config, name) < 0:
      _fail(name, getattr(config, name), 'an integer >= 0')
  for name in ('momentum', 'renorm_momentum', 'optimizer_momentum'):
    if not 0.0 <= getattr(config, name) <= 1.0:
      _fail(name, getattr(config, name), 'a number in [0, 1] (BN momentum is the weight of the old average)')
  if config.momentum_max is not None and not 0.0 <= config.momentum_max <= 1.0:
    _fail('momentum_max', config.momentum_max, 'a number in [0, 1]')
  if not 0.0 < config.momentum_decay_rate < 1.0:
    _fail('momentum_decay_rate', config.momentum_decay_rate, 'a number in (0, 1)')
  if config.momentum_decay_steps <= 0:
    _fail('momentum_decay_steps', config.momentum_decay_steps, 'a number > 0')
  if not config.epsilon > 0:
    _fail('epsilon', config.epsilon, 'a number > 0')
  if not 0.0 <= config.dropout_rate < 1.0:
    _fail('dropout_rate', config.dropout_rate, 'a number in [0, 1)')
  if config.dropout_placement == 'none' and config.dropout_rate > 0:
    _fail('dropout_rate', config.dropout_rate, '0 with --dropout_placement=none (choose a placement)')
  if config.dropout_placement != 'none' and config.dropout_rate == 0:
    _fail('dropout_rate', config.dropout_rate, f'> 0 with --dropout_placement={config.dropout_placement}')
  if config.learning_rate <= 0:
    _fail('learning_rate', config.learning_rate, 'a number > 0')
  if config.weight_decay < 0:
    _fail('weight_decay', config.weight_decay, 'a number >= 0')
  if config.rmax < 1.0:
    _fail('rmax', config.rmax, 'a number >= 1')
  if config.dmax < 0.0:
    _fail('dmax', config.dmax, 'a number >= 0')
  defaults = TrainConfig()
  if config.norm != 'renorm':
    for name in ('renorm_momentum', 'rmax', 'dmax', 'renorm_clipping'):
      if getattr(config, name) != getattr(defaults, name):
        _fail(name, getattr(config, name), f'its default with --norm={config.norm} (it is a renorm option)')
  if config.norm == 'ghost':
    if config.virtual_batch_size is None:
      _fail('virtual_batch_size', None, 'a positive integer with --norm=ghost')
  if config.virtual_batch_size is not None:
    if config.norm not in ('ghost', 'renorm'):
      _fail('virtual_batch_size', config.virtual_batch_size, f'unset with --norm={config.norm} (use --norm=ghost)')
    if config.virtual_batch_size < 1 or config.batch_size % config.virtual_batch_size:
      _fail('virtual_batch_size', config.virtual_batch_size, f'a positive divisor of --batch_size={config.batch_size}')
  if config.norm == 'none':
    for name in ('momentum_schedule', 'debias', 'update_stats', 'eval_stats', 'center', 'scale'):
      if getattr(config, name) != getattr(defaults, name):
        _fail(name, getattr(config, name), 'its default with --norm=none (there are no BN layers)')
  if config.augment and config.dataset != 'cifar10':
    _fail('augment', config.augment, 'false unless --dataset=cifar10')
  image_model = {'mlp_seed': None, 'mlp_bn_paper': None, 'cnn_seed': 'cifar10'}[config.model]
  if image_model is not None and config.dataset != image_model:
    _fail('model', config.model, f'a model for --dataset={config.dataset} (cnn_seed takes 32x32x3 images)')
  if config.num_devices is not None:
    if config.num_devices < 1:
      _fail('num_devices', config.num_devices, 'a positive integer (or unset for every device)')
    if config.batch_size % config.num_devices:
      _fail('batch_size', config.batch_size,
            f'a multiple of --num_devices={config.num_devices} (every device takes an equal share of the batch)')
    local_batch = config.batch_size // config.num_devices
    if config.virtual_batch_size is not None and local_batch % config.virtual_batch_size:
      _fail('virtual_batch_size', config.virtual_batch_size,
            f'a divisor of the per-device batch --batch_size / --num_devices = {local_batch} '
            '(ghost batches do not straddle devices)')
  if config.num_processes is not None and config.num_processes < 1:
    _fail('num_processes', config.num_processes, 'a positive integer')
  if config.process_id is not None and not 0 <= config.process_id < (config.num_processes or 1 << 30):
    _fail('process_id', config.process_id, f'an integer in [0, --num_processes={config.num_processes})')
  if config.lr_warmup_steps and config.lr_schedule == 'step':
    _fail('lr_warmup_steps', config.lr_warmup_steps, '0 with --lr_schedule=step')
  return config


# ----------------------------------------------------------------------------
# Presets: the source material's studies. A preset maps to overrides of the
# defaults; `variants`, if present, are the runs it compares side by side.

PRESETS: dict[str, dict[str, Any]] = {
    'seed000': dict(
        description='MNIST MLP, plain vs BN: Adam, 20 epochs, batch 500, test set as validation.',
        overrides=dict(dataset='mnist', model='mlp_seed', optimizer='adam', learning_rate=1e-3,
                       epochs=20, batch_size=500, validation='test', scaling='unit'),
        variants={'plain': dict(norm='none'), 'bn': dict(norm='bn')},
    ),
    'seed003': dict(
        description='CIFAR-10 CNN with BN: Adam 1e-4, batch 32, 30 epochs, 30% of train held out (seed 777).',
        overrides=dict(dataset='cifar10', model='cnn_seed', norm='bn', optimizer='adam', learning_rate=1e-4,
                       epochs=30, batch_size=32, validation='0.3', validation_seed=777, scaling='standardize'),
        variants=None,
    ),
}


def resolve(preset: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, TrainConfig]:
  """The validated configs of a run: one per variant of the preset (one, named 'run', without).

  Args:
    preset: a name in PRESETS, or None.
    overrides: field values given explicitly (flags); they win over the preset.

  Returns:
    `{variant_name: TrainConfig}`; a variant's own settings (e.g. norm='none')
    give way to explicit overrides too.
  """
  overrides = dict(overrides or {})
  unknown = sorted(set(overrides) - set(FIELDS))
  if unknown:
    raise ValueError(f'unknown settings {unknown}; the settings are {list(FIELDS)}.')
  if preset is None:
    return {'run': validate(TrainConfig(**overrides))}
  if preset not in PRESETS:
    _fail('preset', preset, f'one of {", ".join(PRESETS)}')
  base = dict(PRESETS[preset]['overrides'])
  variants = PRESETS[preset]['variants'] or {'run': {}}
  return {name: validate(TrainConfig(**{**base, **variant, **overrides})) for name, variant in variants.items()}
