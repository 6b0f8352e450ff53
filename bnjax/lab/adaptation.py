"""Test-time adaptation in the lab: a trained run evaluated on (shifted) test data with each method of
`bnjax.adapt` (`--adapt=source,prediction_bn,prior,adabn,tent`).

    errors = evaluate_methods(config, model, state, images, labels)   # {'source': 0.41, 'tent': 0.22, ...}

The test split is cut into batches of `--test_batch_size` examples in its stored order (the last
partial batch is left out, so that every method sees the same examples and every test batch has
the same size). Each batch runs through one jitted function called from Python: XLA:CPU runs
convolutions inside a scan about 30x slower (`bnjax.lab.engine`), and there are few batches.

Per method (dropout off throughout):
- source: inference with the moving statistics;
- prediction_bn: each test batch normalized with its own statistics (training mode, statistics thrown away;
  renorm layers apply their r and d as in training, ghost layers normalize over ghost batches);
- prior: `bnjax.adapt.prior_bn` with N = `--adapt_prior_n`;
- adabn: precise statistics of the whole test split (`bnjax.adapt.adabn`), then inference;
- tent: `bnjax.adapt` TENT steps over the batches in order (`--tent_optimizer`, `--tent_lr`,
  `--tent_steps`, `--tent_episodic`).
Models without moving statistics (group/layer norm, none) have nothing to re-estimate: prediction_bn,
prior and adabn are the source model there, and TENT adapts their norm scale and bias.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnjax import adapt
from bnjax.lab import config as config_lib
from bnjax.lab.options import ADAPT_METHODS as METHODS
from bnjax.lab.options import adapt_methods


def methods_of(config) -> tuple[str, ...]:
  return adapt_methods(config.adapt)


def tent_optimizer(config) -> optax.GradientTransformation:
  if config.tent_optimizer == 'sgd':
    return optax.sgd(config.tent_lr, momentum=0.9)  # TENT's ImageNet setting
  return optax.adam(config.tent_lr)  # TENT's CIFAR-10-C setting (lr 1e-3)


def test_batches(images, labels, batch_size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`([S, B, ...], [S, B])`: the first `S * B` examples in order, S = len // B."""
  steps = images.shape[0] // batch_size
  used = steps * batch_size
  return (images[:used].reshape((steps, batch_size) + images.shape[1:]), labels[:used].reshape(steps, batch_size))



def _error(logits: list, labels) -> float:
  predictions = np.concatenate([np.asarray(jnp.argmax(l, -1)) for l in logits])
  return float(np.mean(predictions != np.asarray(labels).reshape(-1)))


def evaluate_methods(config, model, state, images, labels, methods: tuple[str, ...] | None = None) -> dict[str, float]:
  """`{method: test error}` of the trained `state` (`engine.TrainState`) on `images [N, ...]`, `labels [N]`."""
  methods = methods or methods_of(config)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  hparams = {'dropout_rate': 0.0} if 'dropout_rate' in config_lib.model_values(config) else None
  train_apply = lambda v, x, mutable: model.apply(v, x, train=True, hparams=hparams, mutable=mutable)
  infer = jax.jit(lambda v, x: model.apply(v, x, train=False, hparams=hparams))
  batches, batch_labels = test_batches(images, labels, config.test_batch_size)
  has_stats = config_lib.has_moving_statistics(config)
  errors = {}
  for method in methods:
    if method == 'source' or (method in ('prediction_bn', 'prior', 'adabn') and not has_stats):
      errors[method] = _error([infer(variables, x) for x in batches], batch_labels)
    elif method == 'prediction_bn':
      fn = jax.jit(lambda v, x: adapt.prediction_bn(train_apply, v, x))
      errors[method] = _error([fn(variables, x) for x in batches], batch_labels)
    elif method == 'prior':
      fn = jax.jit(lambda v, x: adapt.prior_bn(train_apply, v, x, config.adapt_prior_n))
      errors[method] = _error([fn(variables, x) for x in batches], batch_labels)
    elif method == 'adabn':
      stats = adapt.adabn(train_apply, variables, list(batches))
      target = {**variables, 'batch_stats': stats}
      errors[method] = _error([infer(target, x) for x in batches], batch_labels)
    elif method == 'tent':
      errors[method] = _error(_tent_logits(config, train_apply, variables, batches), batch_labels)
    else:
      raise ValueError(f'--adapt={method!r} is invalid: expected items of {", ".join(METHODS)}.')
  return errors


def _tent_logits(config, train_apply, variables: Mapping[str, Any], batches) -> list:
  optimizer = tent_optimizer(config)
  paths = adapt.norm_module_paths(train_apply, variables, batches[0])
  norm, rest = adapt.split_norm_params(variables['params'], paths)
  if not norm:  # no norm layer (--norm=none): nothing to adapt
    infer = jax.jit(lambda x: train_apply(variables, x, mutable=['batch_stats'])[0])
    return [infer(x) for x in batches]
  step = jax.jit(lambda s, x: adapt.tent_step(train_apply, optimizer, variables, rest, s, x))
  start = adapt.tent_init(optimizer, norm)
  state, logits = start, []
  for x in batches:
    current = start if config.tent_episodic else state
    for _ in range(config.tent_steps):
      out, current = step(current, x)
    logits.append(out)
    state = current
  return logits


def summary_entries(errors: Mapping[str, float]) -> dict[str, float]:
  """The summary's fields: `test_error_<method>`."""
  return {f'test_error_{method}': error for method, error in errors.items()}
