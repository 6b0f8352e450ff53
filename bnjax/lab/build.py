"""From a `TrainConfig` to the objects of a run: model, optimizer, data.

The one place where configuration values become objects, so that the CLI,
the sweeps and user code build runs the same way.
"""

from __future__ import annotations

import math

import flax.linen as nn
import optax

from bnjax.lab import data as data_lib
from bnjax.lab import models
from bnjax.lab import options as options_lib
from bnjax import schedules
from bnjax.lab.config import TrainConfig, validation_fraction


def model(config: TrainConfig) -> nn.Module:
  """The configured Flax module (`bnjax.lab.models.LabModel`): the model's builder, and the norm kind with
  the options it takes.

  The norm layer options come from the option table: each option the kind
  takes (`NORM_KINDS[norm].options`) that is a layer argument, with
  momentum, rmax and dmax turned into their schedules where configured.
  """
  kind = options_lib.norm_kind(config.norm)
  norm_options = {name: getattr(config, name) for name in kind.options if options_lib.OPTIONS[name].layer_arg}
  if 'momentum' in norm_options:
    norm_options['momentum'] = momentum(config)
  if 'rmax' in norm_options:
    norm_options['rmax'], norm_options['dmax'] = renorm_clipping(config)
  return models.get(
      config.model,
      norm=config.norm,
      activation=config.activation,
      norm_position=config.norm_position,
      dropout_placement=config.dropout_placement,
      dropout_rate=config.dropout_rate,
      conv_impl=config.conv_impl,
      norm_options=norm_options,
  )


def momentum(config: TrainConfig):
  """BN momentum: the number, or the inverse-decay schedule of the source."""
  if config.momentum_schedule == 'inverse_decay':
    return schedules.inverse_decay_momentum(
        config.momentum_decay_rate, config.momentum_decay_steps, config.momentum_max
    )
  return config.momentum


def renorm_clipping(config: TrainConfig):
  """`(rmax, dmax)`: numbers, or the Batch Renorm paper's warm-up schedules."""
  if config.renorm_clipping == 'warmup':
    return schedules.renorm_clipping_warmup(
        warmup_steps=config.renorm_warmup_steps,
        rmax_end_step=config.rmax_end_step,
        dmax_end_step=config.dmax_end_step,
        rmax=config.rmax,
        dmax=config.dmax,
    )
  return config.rmax, config.dmax


def learning_rate(config: TrainConfig, total_steps: int) -> optax.Schedule:
  """constant | cosine (to 0 at the end) | step (x0.1 at 50% and 75%), after an optional linear warm-up."""
  peak = config.learning_rate
  warmup = min(config.lr_warmup_steps, max(total_steps - 1, 0))
  if config.lr_schedule == 'cosine':
    if warmup:
      return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total_steps)
    return optax.cosine_decay_schedule(peak, total_steps)
  if config.lr_schedule == 'step':
    return optax.piecewise_constant_schedule(
        peak, {int(total_steps * 0.5): 0.1, int(total_steps * 0.75): 0.1}
    )
  if warmup:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
    )
  return optax.constant_schedule(peak)


def weight_decay_mask(config: TrainConfig, norm_paths):
  """optax's `mask` of the weight decay: None (every parameter decays), or with `--norm_weight_decay=false`
  a function leaving the parameters of the norm layers at `norm_paths` (`models.norm_layer_paths`) alone."""
  if config.norm_weight_decay or not config.weight_decay:
    return None
  if norm_paths is None:
    raise ValueError('--norm_weight_decay=false needs the paths of the norm layers (models.norm_layer_paths).')
  return models.norm_parameter_mask(norm_paths)


def optimizer(config: TrainConfig, total_steps: int, norm_paths=None) -> optax.GradientTransformation:
  """adam (adamw with --weight_decay) | sgd | momentum (heavy ball), with the learning-rate schedule.

  The learning rate is an injected hyperparameter (`opt_state.hyperparams`),
  so K vmapped runs can each hold their own. `norm_paths`: the model's norm
  layers (`models.norm_layer_paths`), needed with `--norm_weight_decay=false`.
  """
  lr = learning_rate(config, total_steps)
  mask = weight_decay_mask(config, norm_paths)

  def make(learning_rate):
    if config.optimizer == 'adam':
      if config.weight_decay:
        return optax.adamw(learning_rate, weight_decay=config.weight_decay, mask=mask)
      return optax.adam(learning_rate)
    momentum = config.optimizer_momentum if config.optimizer == 'momentum' else None
    sgd = optax.sgd(learning_rate, momentum=momentum)
    if config.weight_decay:
      return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=mask), sgd)
    return sgd

  return optax.inject_hyperparams(make)(learning_rate=lr)


def dataset(config: TrainConfig, put=None) -> data_lib.Dataset:
  """The data of the run, prepared as the config says (`put=None` leaves it on the host)."""
  return data_lib.load(
      config.dataset,
      source=config.data_source,
      data_dir=config.data_dir,
      scaling=config.scaling,
      validation='test' if validation_fraction(config) is None else validation_fraction(config),
      validation_seed=config.validation_seed,
      put=put,
      corruption=config.corruption,
      severity=config.severity,
      corruption_seed=config.corruption_seed,
  )


def steps_per_epoch(config: TrainConfig, num_train: int) -> int:
  """Full batches per epoch (the last partial batch is dropped)."""
  steps = num_train // config.batch_size
  if steps < 1:
    raise ValueError(
        f'--batch_size={config.batch_size} is larger than the {num_train} training examples.'
    )
  return steps


def total_steps(config: TrainConfig, num_train: int) -> int:
  """Training steps of the run: --steps, or --epochs full epochs."""
  return config.steps if config.steps is not None else config.epochs * steps_per_epoch(config, num_train)


def num_epochs(config: TrainConfig, num_train: int) -> int:
  """Epochs the run loops over (the last may be partial when --steps is given)."""
  return math.ceil(total_steps(config, num_train) / steps_per_epoch(config, num_train))
