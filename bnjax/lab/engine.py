"""Training and evaluation as pure functions of (state, batch).

The whole data set lives on the device. An epoch is a device-side permutation
of the training examples, cut into `[steps, batch_size]` index batches, and a
jitted `lax.scan` of `train_step` over them: no host work per step. (The
caller may scan the epoch in a few chunks to refresh a progress bar; the
result is the same.)

One exception, measured: on XLA:CPU a convolution inside `lax.scan` runs
about 30x slower than the same convolution outside one (its gradient: 2.06 s
vs 0.06 s for four 32x32x32 batches; a whole cnn_seed step 1.6 s vs 0.07 s),
even when the scan is unrolled. So for convolutional models on CPU,
`step_loop='python'` drives the epoch with one jitted step per call, no scan
(the host only dispatches; each step takes tens of milliseconds);
`step_loop_for` picks this automatically.

The last partial batch of an epoch is dropped: every step sees exactly
`batch_size` examples, so BN's batch statistics always come from a full batch,
and each epoch reshuffles, so no example is left out systematically.
Evaluation covers every example: full batches in one scan, then the
remainder as one smaller batch.

Everything random derives from `TrainState.rng` with `fold_in(step)` (dropout,
augmentation) or `fold_in(epoch)` (shuffling): a run is deterministic given
its seed, and a run resumed from a checkpoint continues exactly.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bnjax.lab import models

Array = jnp.ndarray

_SHUFFLE_STREAM = 1  # fold_in tags keep the random streams apart
_STEP_STREAM = 2


class TrainState(NamedTuple):
  """Everything a training run carries from step to step (a pytree: jit, vmap, checkpoint).

  Attributes:
    params: the model's trainable parameters.
    batch_stats: the BN moving statistics (the model's `batch_stats` collection).
    opt_state: the optimizer's state.
    step: `[]` int32, training steps taken.
    rng: `[2]` uint32 base key of the run; never advanced, only folded.
  """

  params: Any
  batch_stats: Any
  opt_state: Any
  step: Array
  rng: Array


class Metrics(NamedTuple):
  """Sums over examples, so that batches and devices add up exactly."""

  loss_sum: Array
  correct: Array
  count: Array

  def mean_loss(self):
    return self.loss_sum / jnp.maximum(self.count, 1)

  def accuracy(self):
    return self.correct / jnp.maximum(self.count, 1)


def init_train_state(model: nn.Module, optimizer: optax.GradientTransformation, seed: int, sample: Array) -> TrainState:
  """Initial parameters, moving statistics and optimizer state for `sample`'s shape `[N, ...]`."""
  rng = jax.random.PRNGKey(seed)
  variables = model.init({'params': jax.random.fold_in(rng, 0)}, sample, train=False)
  params = variables['params']
  return TrainState(
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=optimizer.init(params),
      step=jnp.zeros((), jnp.int32),
      rng=rng,
  )


def batch_metrics(logits: Array, labels: Array) -> Metrics:
  """Softmax cross-entropy and accuracy sums for `logits [N, K]`, integer `labels [N]`."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  correct = jnp.sum(jnp.argmax(logits, -1) == labels)
  return Metrics(jnp.sum(losses), correct.astype(jnp.float32), jnp.asarray(labels.shape[0], jnp.float32))


def train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    images: Array,
    labels: Array,
    hparams: Mapping | None = None,
    *,
    update_stats: bool = True,
    augment: Callable[[Array, Array], Array] | None = None,
    axis_name: str | None = None,
    freeze_norm: bool = False,
) -> tuple[TrainState, Metrics]:
  """One optimizer step on a batch `images [B, ...]`, `labels [B]`.

  Args:
    hparams: values the model takes at call time (momentum, dropout_rate, ...;
      see `bnjax.lab.models`), e.g. one of K vmapped runs' values.
    update_stats: False reproduces the classic bug: train with batch
      statistics but never keep the updated moving statistics.
    augment: optional `(key, images) -> images`, applied on device.
    freeze_norm: frozen BN: the norm layers normalize with (and keep) their
      moving statistics (`bnjax.lab.models.LabModel`).
    axis_name: data parallelism (see `bnjax.lab.parallel`): the step runs under
      `shard_map` on one shard of the global batch per device along this
      mapped axis, with the state replicated. The loss is the local sum over
      the global batch size, so that autodiff's sum over devices of the
      replicated parameters' gradients is the gradient of the global mean;
      the metrics are summed over devices; each device draws its own dropout
      and augmentation randomness.
  """
  step_rng = jax.random.fold_in(jax.random.fold_in(state.rng, _STEP_STREAM), state.step)
  global_batch = labels.shape[0]
  if axis_name is not None:
    step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
    global_batch *= jax.lax.axis_size(axis_name)
  augment_rng, dropout_rng = jax.random.split(step_rng)
  if augment is not None:
    images = augment(augment_rng, images)

  def loss_fn(params):
    if axis_name is not None:
      # The replicated parameters enter each device's computation here: the
      # transpose of this cast sums their gradients over the devices (the
      # all-reduce of data parallelism), once per parameter.
      params = jax.lax.pcast(params, axis_name, to='varying')
    logits, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats},
        images,
        train=True,
        hparams=hparams,
        rngs={'dropout': dropout_rng},
        mutable=['batch_stats'],
        **({'freeze_norm': True} if freeze_norm else {}),
    )
    metrics = batch_metrics(logits, labels)
    return metrics.loss_sum / global_batch, (metrics, updates.get('batch_stats', {}))

  grads, (metrics, new_batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    metrics = Metrics(*jax.lax.psum(tuple(metrics), axis_name))
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_state = TrainState(
      params=optax.apply_updates(state.params, updates),
      batch_stats=new_batch_stats if update_stats else state.batch_stats,
      opt_state=opt_state,
      step=state.step + 1,
      rng=state.rng,
  )
  return new_state, metrics


def eval_step(
    model: nn.Module,
    state: TrainState,
    images: Array,
    labels: Array,
    hparams: Mapping | None = None,
    *,
    eval_stats: str = 'moving',
) -> Metrics:
  """Metrics of a batch: with the moving statistics (the correct way), or with the batch's own.

  `eval_stats='batch'` evaluates as in training (each batch normalized by
  its own statistics, updates discarded) but without dropout.
  """
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  if eval_stats == 'batch':
    hparams = dict(hparams or {}, dropout_rate=0.0)
    logits, _ = model.apply(variables, images, train=True, hparams=hparams, mutable=['batch_stats'])
  else:
    logits = model.apply(variables, images, train=False, hparams=hparams)
  return batch_metrics(logits, labels)


def _add(a: Metrics, b: Metrics) -> Metrics:
  return Metrics(*(x + y for x, y in zip(a, b)))


def zero_metrics() -> Metrics:
  return Metrics(*(jnp.zeros((), jnp.float32) for _ in range(3)))


def epoch_batches(state: TrainState, epoch: int | Array, num_examples: int, batch_size: int) -> Array:
  """`[num_examples // batch_size, batch_size]` example indices of one epoch, shuffled on device."""
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, _SHUFFLE_STREAM), epoch)
  steps = num_examples // batch_size
  return jax.random.permutation(rng, num_examples)[: steps * batch_size].reshape(steps, batch_size)


STEP_LOOPS = ('auto', 'scan', 'python')
# How evaluation normalizes: 'moving' statistics (inference, the correct way), or each 'batch''s own.
EVAL_STATS = ('moving', 'batch')


def step_loop_for(model: nn.Module, choice: str = 'auto', backend: str | None = None, sample=None) -> str:
  """'scan' or 'python': how to drive the steps of an epoch (see the module docstring).

  'auto' is 'python' for models with convolutions on the CPU backend, 'scan' otherwise (`sample [N, ...]`:
  an input the model is traced on to find its convolutions; default an image of its data set).
  """
  if choice not in STEP_LOOPS:
    raise ValueError(f'step_loop={choice!r}: expected one of {STEP_LOOPS}.')
  if choice != 'auto':
    return choice
  on_cpu = (backend or jax.default_backend()) == 'cpu'
  return 'python' if on_cpu and models.has_convolutions(model, sample) else 'scan'


def make_train_steps(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    *,
    update_stats: bool = True,
    augment: Callable[[Array, Array], Array] | None = None,
    unroll: bool = False,
    axis_name: str | None = None,
    freeze_norm: bool = False,
) -> Callable:
  """`run(state, images, labels, batch_indices [S, B], hparams) -> (state, Metrics)`: S steps in one scan.

  Not jitted: jit it (with the state donated) or vmap it first over K runs.
  `unroll=True` writes the S steps out one after the other (no scan at
  all): use it with small S (e.g. 1, `step_loop='python'`). `axis_name`: see
  `train_step` (`bnjax.lab.parallel.make_train_steps` wraps this in `shard_map`).
  """
  step = functools.partial(
      train_step, model, optimizer, update_stats=update_stats, augment=augment, axis_name=axis_name,
      freeze_norm=freeze_norm,
  )

  def run(state, images, labels, batch_indices, hparams=None):
    def body(carry, indices):
      state, totals = carry
      state, metrics = step(state, images[indices], labels[indices], hparams)
      return (state, _add(totals, metrics)), None

    carry = (state, zero_metrics())
    if unroll:
      # Not lax.scan(unroll=True): any scan, even unrolled, puts the step in a
      # nested computation where XLA:CPU's convolutions are as slow as in a loop.
      for i in range(batch_indices.shape[0]):
        carry, _ = body(carry, batch_indices[i])
      return carry
    (state, totals), _ = jax.lax.scan(body, carry, batch_indices)
    return state, totals

  return run


def make_evaluate(model: nn.Module, *, batch_size: int, eval_stats: str = 'moving') -> Callable:
  """`evaluate(state, images, labels, hparams) -> Metrics` over every example, in batches.

  Full batches run in one scan; the remainder (if any) as one smaller batch.
  With `eval_stats='batch'` the batch size is part of the experiment (the
  statistics of `batch_size` test examples), so the remainder batch's
  statistics come from fewer examples. A ghost-batch model (its
  `virtual_batch_size` set) normalizes over ghost batches in that mode: the
  batch size is rounded down to a multiple of the ghost batch, and the last
  `num % virtual_batch_size` examples, which fill no ghost batch, are left out
  (`Metrics.count` says how many were evaluated).
  """
  if eval_stats not in EVAL_STATS:
    raise ValueError(f'eval_stats={eval_stats!r}: expected one of {EVAL_STATS}.')
  step = functools.partial(eval_step, model, eval_stats=eval_stats)
  group = getattr(model, 'virtual_batch_size', None) if eval_stats == 'batch' else None
  if group:
    batch_size = max(group, batch_size - batch_size % group)

  def evaluate(state, images, labels, hparams=None):
    if group:
      usable = images.shape[0] - images.shape[0] % group
      images, labels = images[:usable], labels[:usable]
    num = images.shape[0]
    full = num // batch_size
    totals = zero_metrics()
    if full:
      shaped = lambda a: a[: full * batch_size].reshape((full, batch_size) + a.shape[1:])

      def body(totals, batch):
        return _add(totals, step(state, batch[0], batch[1], hparams)), None

      totals, _ = jax.lax.scan(body, totals, (shaped(images), shaped(labels)))
    if num % batch_size:
      totals = _add(totals, step(state, images[full * batch_size :], labels[full * batch_size :], hparams))
    return totals

  return evaluate
