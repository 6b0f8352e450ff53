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
  renorm layers by the batch statistics alone, r = 1 and d = 0; ghost layers over ghost batches);
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


def make_evaluator(config, model):
  """`evaluate(state, images, labels, methods=None) -> {method: test error}` for one run's model, its jitted
  functions compiled once and reused for every test set (`state`: an `engine.TrainState`)."""
  hparams = {'dropout_rate': 0.0} if 'dropout_rate' in config_lib.model_values(config) else None
  train_apply = lambda v, x, mutable: model.apply(v, x, train=True, hparams=hparams, mutable=mutable)
  infer = jax.jit(lambda v, x: model.apply(v, x, train=False, hparams=hparams))
  prediction = jax.jit(lambda v, x: adapt.prediction_bn(train_apply, v, x))
  prior = jax.jit(lambda v, x: adapt.prior_bn(train_apply, v, x, config.adapt_prior_n))
  optimizer = tent_optimizer(config)
  tent_step = jax.jit(lambda v, rest, s, x: adapt.tent_step(train_apply, optimizer, v, rest, s, x))
  has_stats = config_lib.has_moving_statistics(config)

  def tent_logits(variables, batches) -> list:
    paths = adapt.norm_module_paths(train_apply, variables, batches[0])
    norm, rest = adapt.split_norm_params(variables['params'], paths)
    if not norm:  # no norm layer (--norm=none): nothing to adapt
      return [infer(variables, x) for x in batches]
    start = adapt.tent_init(optimizer, norm)
    state, logits = start, []
    for x in batches:
      current = start if config.tent_episodic else state
      for _ in range(config.tent_steps):
        out, current = tent_step(variables, rest, current, x)
      logits.append(out)
      state = current
    return logits

  def evaluate(state, images, labels, methods: tuple[str, ...] | None = None) -> dict[str, float]:
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    batches, batch_labels = test_batches(images, labels, config.test_batch_size)
    errors = {}
    for method in methods or methods_of(config):
      if method == 'source' or (method in ('prediction_bn', 'prior', 'adabn') and not has_stats):
        logits = [infer(variables, x) for x in batches]
      elif method == 'prediction_bn':
        logits = [prediction(variables, x) for x in batches]
      elif method == 'prior':
        logits = [prior(variables, x) for x in batches]
      elif method == 'adabn':
        target = {**variables, 'batch_stats': adapt.adabn(train_apply, variables, list(batches))}
        logits = [infer(target, x) for x in batches]
      elif method == 'tent':
        logits = tent_logits(variables, batches)
      else:
        raise ValueError(f'--adapt={method!r} is invalid: expected items of {", ".join(METHODS)}.')
      errors[method] = _error(logits, batch_labels)
    return errors

  return evaluate


def evaluate_methods(config, model, state, images, labels, methods: tuple[str, ...] | None = None) -> dict[str, float]:
  """`{method: test error}` of the trained `state` (`engine.TrainState`) on `images [N, ...]`, `labels [N]`."""
  return make_evaluator(config, model)(state, images, labels, methods)


def summary_entries(errors: Mapping[str, float]) -> dict[str, float]:
  """The summary's fields: `test_error_<method>`."""
  return {f'test_error_{method}': error for method, error in errors.items()}
