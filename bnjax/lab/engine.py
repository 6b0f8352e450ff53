"""What one training step does, and every form the loop runs it in: pure functions of (state, batch).

    state = engine.init_train_state(model, optimizer, seed, images[:1])
    run = jax.jit(engine.make_train_steps(model, optimizer), donate_argnums=0)
    state, metrics = run(state, images, labels, engine.epoch_batches(state, 0, num_train, batch_size))

- `train_step`: loss, gradients, the BN statistics' update, the optimizer's
  update, for one batch; `eval_step` its evaluation;
- `make_train_steps`: S steps in one `lax.scan` (one device), and its
  multi-device forms: `make_data_parallel_train_steps` (one run, its batch
  split over the devices) and `over_lanes` (K runs vmapped, each device
  training its own lanes); `make_evaluate` and
  `make_data_parallel_evaluate` alike;
- `precise_state`: precise BN's population statistics.
`bnjax.lab.programs` compiles these for a configured run; `bnjax.lab.parallel`
holds the processes, meshes and device placement they run on.

The whole data set lives on the device. An epoch is a device-side permutation
of the training examples, cut into `[steps, batch_size]` index batches, and a
jitted `lax.scan` of `train_step` over them: no host work per step. (The
caller may scan the epoch in a few chunks to refresh a progress bar; the
result is the same.)

One exception, measured: on XLA:CPU a convolution inside `lax.scan` runs
about 30x slower than the same convolution outside one (its gradient: 2.06 s
vs 0.06 s for four 32x32x32 batches; a whole cifar_cnn step 1.6 s vs 0.07 s),
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
from jax.sharding import Mesh, PartitionSpec as P

from bnjax.lab import models, parallel
from bnjax.lab.options import NORM_KINDS, OPTIONS

Array = jnp.ndarray

_SHUFFLE_STREAM = 1  # fold_in tags keep the random streams apart
_STEP_STREAM = 2
CROSS_DEVICE_STATS = OPTIONS['cross_device_stats'].choices


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

  def add(self, other: 'Metrics') -> 'Metrics':
    """The sums of two sets of batches."""
    return Metrics(*(a + b for a, b in zip(self, other)))


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
  """One optimizer step on a batch `images [B, ...]`, `labels [B]`: loss, gradients, BN statistics, update.

  Args:
    hparams: values the model takes at call time (momentum, dropout_rate, ...;
      see `bnjax.lab.models`), e.g. one of K vmapped runs' values.
    update_stats: False reproduces the classic bug: train with batch
      statistics but never keep the updated moving statistics.
    augment: optional `(key, images) -> images`, applied on device.
    freeze_norm: frozen BN: the norm layers normalize with (and keep) their
      moving statistics (`bnjax.lab.models.LabModel`).
    axis_name: data parallelism (`make_data_parallel_train_steps`): this
      device's shard of the global batch, the state replicated. The loss is
      the local sum over the global batch size (autodiff then sums the
      gradients over devices into the global mean's), the metrics are summed
      over devices, and each device draws its own randomness.
  """
  augment_rng, dropout_rng = _step_keys(state, axis_name)
  if augment is not None:
    images = augment(augment_rng, images)
  global_batch = labels.shape[0] * (jax.lax.axis_size(axis_name) if axis_name is not None else 1)
  apply = functools.partial(model.apply, train=True, hparams=hparams, rngs={'dropout': dropout_rng},
                            mutable=['batch_stats'], **({'freeze_norm': True} if freeze_norm else {}))

  def loss_fn(params):
    if axis_name is not None:
      # The replicated parameters enter each device's computation here: the
      # transpose of this cast sums their gradients over the devices (the
      # all-reduce of data parallelism), once per parameter.
      params = jax.lax.pcast(params, axis_name, to='varying')
    logits, updates = apply({'params': params, 'batch_stats': state.batch_stats}, images)
    metrics = batch_metrics(logits, labels)
    return metrics.loss_sum / global_batch, (metrics, updates.get('batch_stats', {}))

  grads, (metrics, new_batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    metrics = Metrics(*jax.lax.psum(tuple(metrics), axis_name))
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  batch_stats = new_batch_stats if update_stats else state.batch_stats
  return TrainState(optax.apply_updates(state.params, updates), batch_stats, opt_state, state.step + 1,
                    state.rng), metrics


def _step_keys(state: TrainState, axis_name: str | None) -> tuple[Array, Array]:
  """`(augment key, dropout key)` of the state's step (and of this device, under `axis_name`)."""
  step_rng = jax.random.fold_in(jax.random.fold_in(state.rng, _STEP_STREAM), state.step)
  if axis_name is not None:
    step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
  return jax.random.split(step_rng)


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
  `train_step` (`make_data_parallel_train_steps` wraps this in `shard_map`).
  """
  step = functools.partial(
      train_step, model, optimizer, update_stats=update_stats, augment=augment, axis_name=axis_name,
      freeze_norm=freeze_norm,
  )

  def run(state, images, labels, batch_indices, hparams=None):
    def body(carry, indices):
      state, totals = carry
      state, metrics = step(state, images[indices], labels[indices], hparams)
      return (state, totals.add(metrics)), None

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
        return totals.add(step(state, batch[0], batch[1], hparams)), None

      totals, _ = jax.lax.scan(body, totals, (shaped(images), shaped(labels)))
    if num % batch_size:
      totals = totals.add(step(state, images[full * batch_size :], labels[full * batch_size :], hparams))
    return totals

  return evaluate


def precise_state(model: nn.Module, train_images: Array, state: TrainState, indices: Array,
                  hparams: Mapping | None = None) -> TrainState:
  """`state` with the population statistics of `train_images[indices]` (`[S, B]`) as its `batch_stats`.

  Precise BN (`bnjax.linen.precise_batch_stats`): training-mode passes under the fixed weights, dropout off.
  """
  from bnjax import linen

  values = dict(hparams or {}, dropout_rate=0.0)  # the inputs each layer sees at inference
  apply_fn = lambda variables, images, mutable: model.apply(variables, images, train=True, hparams=values,
                                                            mutable=mutable)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  stats = linen.precise_batch_stats(apply_fn, variables, train_images[indices], num_examples=None)
  return state._replace(batch_stats=stats)


# ----------------------------------------------------------------------------
# The step over several devices: data-parallel (one run, its batch split), or lanes (K runs, split by run).
#
# Data parallelism (measured against jit's SPMD partitioning, see benchmarks/bench_parallel.py): the steps run
# inside `jax.shard_map` over a 1-D mesh with axis `parallel.AXIS` ('batch'). The training state and the data
# arrays are replicated; the global batch indices `[S, B]` (from `epoch_batches`: the same permutation on every
# process, given the seed) are sharded on their batch axis, so device d takes the contiguous slice
# `[d * B/D, (d+1) * B/D)` of every global batch and gathers its examples from its own copy of the data. Each host
# therefore only ever reads its devices' slices of each batch; the arrays are replicated because the data sets
# of this study fit in every device's memory. The model is built with `axis_name='batch'` so that BN reduces
# across devices (`device_model`). The loss is each device's sum over the global batch size; autodiff under
# `shard_map` sums the gradient of the replicated (unvarying) parameters over devices, which is then the gradient
# of the global mean (`train_step` with `axis_name`); the metrics' sums are `psum`'d. Every device then applies
# the same update to its replica: no parameter ever differs across devices (`check_vma` would refuse a varying
# state as a replicated output).


def device_model(model: nn.Module, cross_device_stats: str, local_batch: int) -> nn.Module:
  """`model` as each device runs it: BN over the mapped axis, 'sync' or 'local' statistics.

  - 'sync': the statistics of the whole global batch (all-reduce of per-device
    sums, weighted by valid counts), exactly as on one device with the global batch;
  - 'local': each device normalizes its own shard (multi-GPU training without
    sync BN): ghost BN with the per-device batch as the virtual batch. The
    moving statistics pool every device's groups, so they stay identical on
    every device.

  A model that already has ghost batches (norm='ghost', or renorm with
  `virtual_batch_size`) keeps its groups, which must then divide `local_batch`
  (groups never straddle devices): both modes are then the same.
  """
  if cross_device_stats not in CROSS_DEVICE_STATS:
    raise ValueError(f'--cross_device_stats={cross_device_stats!r} is invalid: expected one of {CROSS_DEVICE_STATS}.')
  norm = getattr(model, 'norm', None)
  virtual = getattr(model, 'virtual_batch_size', None)
  if norm is None or not NORM_KINDS[norm].cross_device:
    return model
  if virtual is not None:
    if local_batch % virtual:
      raise ValueError(
          f'--virtual_batch_size={virtual} does not divide the per-device batch {local_batch} '
          '(--batch_size / --num_devices): ghost batches must not straddle devices.'
      )
    return model.clone(axis_name=parallel.AXIS)
  if cross_device_stats == 'local':
    return model.clone(axis_name=parallel.AXIS, norm='ghost' if norm == 'bn' else norm,
                       norm_options={**model.norm_options, 'virtual_batch_size': local_batch})
  return model.clone(axis_name=parallel.AXIS)


def make_data_parallel_train_steps(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    batch_size: int,
    cross_device_stats: str = 'sync',
    **step_options,
) -> Callable:
  """`make_train_steps`'s `run(state, images, labels, batch_indices [S, B], hparams)`, data-parallel over `mesh`.

  `state`, `images`, `labels` replicated over `mesh` (`parallel.replicate`),
  `batch_indices` the global batches' indices (`B = batch_size`); returns the
  replicated new state and the metrics summed over the global batches.
  `step_options`: `make_train_steps`'s (update_stats, augment, unroll,
  freeze_norm). Not jitted (jit it with the state donated).
  """
  local_batch = parallel.per_device_batch(batch_size, mesh.size)
  run = make_train_steps(device_model(model, cross_device_stats, local_batch), optimizer, axis_name=parallel.AXIS,
                         **step_options)
  sharded = jax.shard_map(run, mesh=mesh, in_specs=(P(), P(), P(), parallel.shard_batch_spec(), P()),
                          out_specs=(P(), P()))

  def parallel_run(state, images, labels, batch_indices, hparams=None):
    if batch_indices.shape[-1] != batch_size:
      raise ValueError(f'batch_indices has shape {batch_indices.shape}; expected [steps, {batch_size}].')
    return sharded(state, images, labels, batch_indices, hparams)

  return parallel_run


def make_data_parallel_evaluate(model: nn.Module, mesh: Mesh, *, batch_size: int,
                                eval_stats: str = 'moving') -> Callable:
  """`make_evaluate`'s `evaluate(state, images, labels, hparams) -> Metrics`, its work split over `mesh`.

  With the moving statistics each example's prediction is its own: every
  device evaluates a contiguous `1/D` of the (replicated) examples, in
  batches of `batch_size / D`, and the metrics are summed over the devices;
  the last `num % D` examples are evaluated on every device. With
  `eval_stats='batch'` which examples share a batch is part of the result,
  so that evaluation stays `make_evaluate`'s, replicated (it runs once, at
  the end of a run). Not jitted.
  """
  whole = make_evaluate(model, batch_size=batch_size, eval_stats=eval_stats)
  if eval_stats != 'moving' or mesh.size == 1:
    return whole
  local = make_evaluate(model, batch_size=-(-batch_size // mesh.size))

  def summed(state, images, labels, hparams):
    return jax.tree.map(lambda total: jax.lax.psum(total, parallel.AXIS), local(state, images, labels, hparams))

  # check_vma=False: the scan starts its sums from (unvarying) zeros and adds each device's own metrics.
  sharded = jax.shard_map(summed, mesh=mesh, in_specs=(P(), P(parallel.AXIS), P(parallel.AXIS), P()), out_specs=P(),
                          check_vma=False)

  def evaluate(state, images, labels, hparams=None):
    split = images.shape[0] - images.shape[0] % mesh.size
    totals = sharded(state, images[:split], labels[:split], hparams)
    if split < images.shape[0]:
      totals = totals.add(whole(state, images[split:], labels[split:], hparams))
    return totals

  return evaluate


def over_lanes(fn: Callable, in_axes: tuple, mesh: Mesh | None = None, **jit_options) -> Callable:
  """`fn` for K runs at once: vmapped over the leading axis of the arguments whose `in_axes` is 0, jitted.

  With a `mesh` (`parallel.lane_mesh`) each device runs its own lanes: the
  vmapped function under `shard_map` over `parallel.RUNS_AXIS`, not jit's SPMD
  partitioner, which on XLA:CPU ran 2 lanes of cifar_cnn over 2 devices 3.8x
  slower (1173 vs 305 ms per step). A device's lanes compute what one device
  computes alone, equal up to rounding.
  """
  fn = jax.vmap(fn, in_axes=in_axes)
  if mesh is not None:
    specs = tuple(P() if axis is None else P(parallel.RUNS_AXIS) for axis in in_axes)
    # check_vma=False: the lanes never communicate, and scans start their sums from unvarying zeros.
    fn = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(parallel.RUNS_AXIS), check_vma=False)
  return jax.jit(fn, **jit_options)
