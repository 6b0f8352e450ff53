"""Measurements of a trained model's normalization inputs, from the model's probes (`bnjax.lab.models`).

Variance shift (Li et al. 2019, "Understanding the disharmony between dropout
and batch normalization"): dropout placed before a norm layer makes the
variance of that layer's input in training (dropout on) differ from its
variance at inference (dropout off), while inference normalizes with
statistics gathered in training. Two ratios per norm layer measure it, each
a geometric mean over the layer's features (a ratio and its inverse weigh
the same, and one near-constant feature cannot dominate):

- `train_over_eval`: Var[input | train mode] / Var[input | inference mode],
  both on the same examples with the same parameters (Li et al.'s definition;
  1 means no shift);
- `moving_over_eval`: the layer's moving variance / Var[input | inference
  mode]: how far off the statistics inference actually uses are (1 is exact).

    shift = variance_shift(model, variables, images, jax.random.PRNGKey(0))
    shift['train_over_eval']    # [num_blocks]

Features whose variance is ~0 in both modes would make a ratio 0/0: both
variances get the model's epsilon added, as in normalization itself.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax import linen as bnflax
from bnjax import norm as norm_lib
from bnjax.lab import models
from bnjax.lab.models import subtree

Array = jnp.ndarray

SHIFT_STREAM = 3  # fold_in tag of the measurement's dropout key from a run's key (bnjax.lab.engine uses 1 and 2)


def probes(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: Array,
    *,
    train: bool,
    rng: Array | None = None,
    hparams: Mapping | None = None,
    probe_unit: int = 0,
) -> dict:
  """The model's probes (`{'block_<i>': {'norm_input': ..., 'activation_input': ...}}`) on `images [N, ...]`.

  `train=True` runs as in training (batch statistics, dropout drawn from
  `rng`), discarding the statistics' updates; `train=False` as at inference.
  """
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  if train:
    _, state = model.apply(variables, images, train=True, hparams=hparams, probe_unit=probe_unit,
                           rngs={'dropout': rng}, mutable=['probes', 'batch_stats'])
  else:
    _, state = model.apply(variables, images, train=False, hparams=hparams, probe_unit=probe_unit,
                           mutable=['probes'])
  return state.get('probes', {})


def with_batch_statistics(model: nn.Module, variables: Mapping[str, Any], images: Array,
                          rng: Array | None = None) -> dict:
  """`variables` whose moving statistics are replaced by one training-mode pass over `images`.

  The model must be built with momentum 0 (the new moving statistics are then
  exactly that pass's batch statistics): e.g. to measure a network at
  initialization as if its moving statistics had caught up. `rng` feeds dropout.
  """
  if not variables.get('batch_stats'):
    return dict(variables)
  _, updates = model.apply(variables, images, train=True, rngs=None if rng is None else {'dropout': rng},
                           mutable=['batch_stats'])
  return {'params': variables['params'], 'batch_stats': updates['batch_stats']}


def _geometric_mean(ratios: Array) -> Array:
  return jnp.exp(jnp.mean(jnp.log(ratios)))


def _block_names(block_probes: Mapping) -> list[str]:
  return sorted(block_probes, key=lambda name: int(name.rsplit('_', 1)[1]))


def variance_shift(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: Array,
    rng: Array,
    hparams: Mapping | None = None,
) -> dict[str, Array | None]:
  """Variance shift of every block's norm-layer input (see the module docstring).

  The moving variance of block i is that of the i-th norm layer the model
  calls, found by its type (`bnjax.lab.models.norm_layer_paths`).

  Args:
    model: a `bnjax.lab.models.LabModel`.
    variables: `{'params': ..., 'batch_stats': ...}` of the trained model.
    images: `[N, ...]` examples to measure on (e.g. a slice of the test set).
    rng: the dropout key of the train-mode pass.
    hparams: the model's call-time values (e.g. a swept dropout rate).

  Returns:
    `{'train_over_eval': [num_blocks], 'moving_over_eval': [num_blocks] or None}`:
    per block, the ratio's geometric mean over features; `moving_over_eval` is None for
    a model without norm layers (for norm='none' the probes still measure
    what a norm layer would receive).
  """
  epsilon = getattr(model, 'epsilon', 1e-3)
  train = probes(model, variables, images, train=True, rng=rng, hparams=hparams)
  infer = probes(model, variables, images, train=False, hparams=hparams)
  names = _block_names(infer)
  if not names:  # a model without norm layers (nor the seed models' blocks) has nothing to measure
    return {'train_over_eval': None, 'moving_over_eval': None}
  eval_var = [infer[name]['norm_input']['var'] + epsilon for name in names]
  train_over_eval = jnp.stack([_geometric_mean((train[name]['norm_input']['var'] + epsilon) / var)
                               for name, var in zip(names, eval_var)])
  stats = variables.get('batch_stats') or {}
  moving_over_eval = None
  layers = [subtree(stats, path) for path in models.norm_layer_paths(model, images[:1])]
  layers = [layer for layer in layers if layer]
  if stats and len(layers) == len(names):
    moving = [norm_lib.moving_statistics(bnflax.norm_state(layer), epsilon)[1] for layer in layers]
    moving_over_eval = jnp.stack([_geometric_mean((m + epsilon) / var) for m, var in zip(moving, eval_var)])
  return {'train_over_eval': train_over_eval, 'moving_over_eval': moving_over_eval}


def state_variance_shift(model: nn.Module, state, images: Array, hparams: Mapping | None = None) -> dict:
  """`variance_shift` of a run's `bnjax.lab.engine.TrainState` (its dropout key derives from the run's seed)."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return variance_shift(model, variables, images, jax.random.fold_in(state.rng, SHIFT_STREAM), hparams)


def activation_percentiles(model: nn.Module, variables: Mapping[str, Any], images: Array, *, block: int = -1,
                           unit: int = 0, train: bool = False, rng: Array | None = None) -> Array:
  """`[3]`: the 15th, 50th and 85th percentiles of one unit's activation input (BN paper, Fig. 1b-c).

  `block`: which block (default the last); `unit`: which of its features;
  `train`: as at inference (moving statistics), or as in training (the
  statistics of `images` as one batch; dropout, if any, from `rng`).
  """
  measured = probes(model, variables, images, train=train, rng=rng, probe_unit=unit)
  return measured[_block_names(measured)[block]]['activation_input']['percentiles']


PROBE_EXAMPLES = 1024  # examples the variance shift is measured on


def probe_examples(images: Array, virtual_batch_size: int | None = None, max_examples: int = PROBE_EXAMPLES) -> Array:
  """The first `max_examples` of `images` (fewer, so that ghost batches of `virtual_batch_size` divide them)."""
  count = min(images.shape[0], max_examples)
  if virtual_batch_size:
    count -= count % virtual_batch_size
  return images[:count]


def shift_summary(shift: Mapping[str, Any]) -> dict[str, Any]:
  """Plain numbers of one model's `variance_shift`, for summaries and results files.

  Returns `variance_shift` and `moving_variance_ratio` (geometric means over blocks) and
  their per-block lists `*_blocks` (None where the model has no norm layers).
  """
  out: dict[str, Any] = {}
  for key, name in (('train_over_eval', 'variance_shift'), ('moving_over_eval', 'moving_variance_ratio')):
    values = shift.get(key)
    blocks = None if values is None else [float(v) for v in jax.device_get(values)]
    out[name] = None if blocks is None else math.exp(sum(map(math.log, blocks)) / len(blocks))
    out[f'{name}_blocks'] = blocks
  return out
