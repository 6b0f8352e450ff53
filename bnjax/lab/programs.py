"""The compiled programs the training loop drives: one run, or K runs vmapped as lanes of one program.

A `Program` is what `bnjax.lab.loop.train` needs, whatever the run:

- `single(config, dataset)`: one run, on one device or data-parallel over
  every device (`bnjax.lab.parallel`); its metrics get a leading lane axis of
  size 1 so that the loop treats it as a group of one lane.
- `lanes(configs, dataset)`: K runs that differ only in values
  (`config.vmapped_fields`: BN/renorm momentum, rmax, dmax, dropout rate,
  learning rate, seed), their `TrainState`s stacked on a leading axis and
  `jax.vmap(engine.make_train_steps(...))` training them in one program.

How each value reaches its lane:
- model values (`config.model_values`) go through `apply(..., hparams=...)`,
  one number per lane;
- the learning rate: every schedule of `build.learning_rate` is the peak times
  a shape, so a group's optimizer is `build.optimizer` at peak 1 chained with
  `optax.inject_hyperparams(optax.scale)`, whose `step_size` holds each lane's
  peak (Adam's update is then bit-for-bit the single run's: the sign flip is exact);
- the seed: each lane's `TrainState.rng` initializes, shuffles and drops out
  exactly as the single run with that seed would.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnjax.lab import build, diagnostics, engine, parallel
from bnjax.lab import config as config_lib
from bnjax.lab.data import augment_cifar


class Plan(NamedTuple):
  """The step counts of a run: full batches per epoch, total steps, epochs (the last may be partial)."""

  steps_per_epoch: int
  total_steps: int
  num_epochs: int

  @classmethod
  def of(cls, config, num_train: int) -> 'Plan':
    plan = cls(build.steps_per_epoch(config, num_train), build.total_steps(config, num_train),
               build.num_epochs(config, num_train))
    if config.freeze_bn_after is not None and config.freeze_bn_after >= plan.num_epochs:
      raise ValueError(f'--freeze_bn_after={config.freeze_bn_after} is invalid: expected fewer than the '
                       f'{plan.num_epochs} epochs of the run.')
    return plan

  def precise_steps(self, config) -> int:
    """Batches of an epoch that hold `config.precise_bn` examples (all of the epoch at most)."""
    return min(self.steps_per_epoch, -(-config.precise_bn // config.batch_size))


@dataclasses.dataclass
class Program:
  """Everything the loop calls; every metric has a leading lane axis `[K]`.

  Attributes:
    configs: the K runs (one for `single`).
    state: the current (stacked, for lanes) `TrainState`.
    plan: the run's step counts.
    step_loop: 'scan' or 'python' (see `bnjax.lab.engine`).
    train_chunk: `(state, batch_indices, frozen=False) -> (state, Metrics[K])`
      for indices `[K, S, B]` (lanes) or `[S, B]` (single); `frozen`: frozen BN.
    compile_chunk: `(state, batch_indices, frozen=False) -> None`: compiles
      `train_chunk` for that many steps without running it (the loop does it
      before timing).
    precise: `(state, batch_indices) -> state` whose `batch_stats` are the
      population statistics of the examples of those batches (precise BN,
      `bnjax.linen.precise_batch_stats`: training-mode passes, dropout off).
    epoch_batches: `(state, epoch) -> indices` of one epoch.
    evaluate: `(state, split, stats) -> Metrics[K]` on 'val' or 'test' with
      'moving' or 'batch' statistics.
    variance_shift: `state -> pytree with leaves [K, ...]` (`bnjax.lab.diagnostics`).
    has_moving_statistics: the norm layers keep moving statistics.
    padding: lanes added to fill the devices (copies of the last run).
  """

  configs: Sequence[Any]
  state: Any
  plan: Plan
  step_loop: str
  train_chunk: Callable
  compile_chunk: Callable
  precise: Callable
  epoch_batches: Callable
  evaluate: Callable
  variance_shift: Callable
  has_moving_statistics: bool
  padding: int = 0

  @property
  def num_lanes(self) -> int:
    """The lanes the program computes (the last `padding` of them fill the devices; their results are dropped)."""
    return len(self.configs)

  @property
  def runs(self) -> Sequence[Any]:
    """The configs of the real lanes."""
    return self.configs[: len(self.configs) - self.padding]


def _compiled_by_length(fn: Callable, *static_args) -> Callable:
  """`fn(state, *static_args, indices, *rest)` compiled once per number of steps (outside epoch timing)."""
  compiled: dict[int, Callable] = {}

  def compile_for(state, indices, *rest):
    length = indices.shape[-2]
    if length not in compiled:
      compiled[length] = fn.lower(state, *static_args, indices, *rest).compile()
    return compiled[length]

  def run(state, indices, *rest):
    return compile_for(state, indices, *rest)(state, *static_args, indices, *rest)

  run.compile_for = compile_for
  return run


def _with_lane_axis(tree):
  return jax.tree.map(lambda leaf: leaf[None], tree)


def single(config, dataset, *, state=None) -> Program:
  """One run: on one device, or data-parallel over `config.num_devices` devices (default: all)."""
  num_train = dataset.train_images.shape[0]
  plan = Plan.of(config, num_train)
  num_devices = parallel.resolve_num_devices(config.num_devices)
  mesh = parallel.make_mesh(num_devices) if num_devices > 1 else None
  if mesh is not None:
    dataset = parallel.replicate(dataset, mesh)
  model = build.model(config)
  optimizer = build.optimizer(config, plan.total_steps, checked_norm_paths(config, model, dataset.train_images[:1]))
  if state is None:
    state = engine.init_train_state(model, optimizer, config.seed, dataset.train_images[:1])
  step_loop = engine.step_loop_for(model, config.step_loop, sample=dataset.train_images[:1])
  options = dict(update_stats=config.update_stats, augment=augment_cifar if config.augment else None,
                 unroll=step_loop == 'python')
  if mesh is not None:
    state = parallel.replicate(state, mesh)

  def steps_for(frozen: bool):
    if mesh is None:
      steps = engine.make_train_steps(model, optimizer, freeze_norm=frozen, **options)
    else:
      steps = parallel.make_train_steps(model, optimizer, mesh, batch_size=config.batch_size,
                                        cross_device_stats=config.cross_device_stats, freeze_norm=frozen, **options)
    return _compiled_by_length(jax.jit(steps, donate_argnums=0), dataset.train_images, dataset.train_labels)

  train = _by_freezing(steps_for)
  moving_statistics = config_lib.has_moving_statistics(config)
  if mesh is None:
    make_evaluate = functools.partial(engine.make_evaluate, model, batch_size=config.eval_batch_size)
  else:  # each device evaluates its share of the examples
    make_evaluate = functools.partial(parallel.make_evaluate, model, mesh, batch_size=config.eval_batch_size)
  evaluators = {'moving': jax.jit(make_evaluate())}
  evaluators['batch'] = jax.jit(make_evaluate(eval_stats='batch')) if moving_statistics else evaluators['moving']
  batches = jax.jit(engine.epoch_batches, static_argnums=(2, 3))

  def train_chunk(state, indices, frozen=False):
    state, metrics = train(frozen)(state, indices)
    return state, _with_lane_axis(metrics)

  precise_jitted = jax.jit(functools.partial(precise_state, model))
  precise = lambda state, indices: precise_jitted(dataset.train_images, state, indices)

  def evaluate(state, split, stats):
    images, labels = _split(dataset, split)
    return _with_lane_axis(evaluators[stats](state, images, labels))

  shift = jax.jit(functools.partial(lane_variance_shift, model))
  variance_shift = lambda state: _with_lane_axis(
      shift(state, diagnostics.probe_examples(dataset.test_images, config.virtual_batch_size), None))

  return Program(
      configs=[config], state=state, plan=plan, step_loop=step_loop, train_chunk=train_chunk,
      compile_chunk=lambda state, indices, frozen=False: train(frozen).compile_for(state, indices),
      precise=precise,
      epoch_batches=lambda state, epoch: batches(state, epoch, num_train, config.batch_size),
      evaluate=evaluate, variance_shift=variance_shift, has_moving_statistics=moving_statistics,
  )


def checked_norm_paths(config, model, sample) -> list | None:
  """The model's norm layers (`models.norm_layer_paths`) where the run needs them (the weight-decay mask), or
  for a model from an import path, checked: a norm asked for and none built is a one-line error."""
  from bnjax.lab import models, registry

  if config.norm_weight_decay and registry.canonical_name(config.model) in registry.ENTRIES:
    return None
  paths = models.norm_layer_paths(model, sample)
  models.check_norm_layers(model, paths)
  return paths


def _by_freezing(make: Callable) -> Callable:
  """`frozen -> make(frozen)`, each made once, when first needed (most runs never freeze)."""
  made: dict[bool, Callable] = {}

  def get(frozen: bool):
    if frozen not in made:
      made[frozen] = make(frozen)
    return made[frozen]

  return get


def precise_state(model, train_images, state, indices, hparams=None):
  """`state` with the population statistics of `train_images[indices]` (`[S, B]`) as its `batch_stats`."""
  from bnjax import linen

  values = dict(hparams or {}, dropout_rate=0.0)  # the inputs each layer sees at inference
  apply_fn = lambda variables, images, mutable: model.apply(variables, images, train=True, hparams=values,
                                                            mutable=mutable)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  stats = linen.precise_batch_stats(apply_fn, variables, train_images[indices], num_examples=None)
  return state._replace(batch_stats=stats)


def _split(dataset, split: str):
  return {'val': (dataset.val_images, dataset.val_labels), 'test': (dataset.test_images, dataset.test_labels)}[split]


# ----------------------------------------------------------------------------
# K runs as lanes of one program.


def group_optimizer(config, total_steps: int, norm_paths=None) -> optax.GradientTransformation:
  """`build.optimizer` at peak learning rate 1, then a per-lane injected `scale` (the peak)."""
  unit = build.optimizer(dataclasses.replace(config, learning_rate=1.0), total_steps, norm_paths)
  return optax.chain(unit, optax.inject_hyperparams(optax.scale)(step_size=1.0))


def init_lane_states(model, optimizer, configs: Sequence[Any], sample):
  """K `TrainState`s stacked on a leading axis: `engine.init_train_state` per seed, each lane's peak lr."""
  seeds = jnp.asarray([c.seed for c in configs], jnp.int32)
  states = jax.jit(jax.vmap(lambda seed: engine.init_train_state(model, optimizer, seed, sample)))(seeds)
  unit_state, scale_state = states.opt_state
  peaks = jnp.asarray([c.learning_rate for c in configs], jnp.float32)
  scale_state = scale_state._replace(hyperparams={**scale_state.hyperparams, 'step_size': peaks})
  return states._replace(opt_state=(unit_state, scale_state))


def lane_values(configs: Sequence[Any]) -> dict[str, Any]:
  """`hparams` of the group: `{name: [K] float32}` for the model's call-time values."""
  return {name: jnp.asarray([getattr(c, name) for c in configs], jnp.float32)
          for name in config_lib.model_values(configs[0])}


def lane_variance_shift(model, state, images, hparams):
  """`diagnostics.variance_shift` of one run's state (the dropout key derives from its seed)."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  rng = jax.random.fold_in(state.rng, diagnostics.SHIFT_STREAM)
  return diagnostics.variance_shift(model, variables, images, rng, hparams)


def _lane_functions(config, total_steps: int, mesh=None, sample=None) -> dict:
  """The jitted vmapped functions of a group; they depend only on the group key and the mesh (cached).

  With a `mesh` (`lane_mesh`) each device runs its own lanes: the vmapped
  function under `shard_map` over `RUNS_AXIS`, not jit's SPMD partitioner,
  which on XLA:CPU ran 2 lanes of cifar_cnn over 2 devices 3.8x slower
  (1173 vs 305 ms per step). A device's lanes compute what one device computes
  alone, equal up to rounding.
  """
  model = build.model(config)
  optimizer = group_optimizer(config, total_steps, checked_norm_paths(config, model, sample))
  step_loop = engine.step_loop_for(model, config.step_loop, sample=sample)

  def vmapped(fn, axes, **jit_options):
    fn = jax.vmap(fn, in_axes=axes)
    if mesh is not None:
      from jax.sharding import PartitionSpec

      specs = tuple(PartitionSpec() if axis is None else PartitionSpec(RUNS_AXIS) for axis in axes)
      # check_vma=False: the lanes never communicate, and scans start their sums from unvarying zeros.
      fn = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(RUNS_AXIS), check_vma=False)
    return jax.jit(fn, **jit_options)

  def train_for(frozen: bool):
    steps = engine.make_train_steps(model, optimizer, update_stats=config.update_stats, freeze_norm=frozen,
                                    augment=augment_cifar if config.augment else None, unroll=step_loop == 'python')
    return vmapped(steps, (0, None, None, 0, 0), donate_argnums=0)

  evaluate = lambda stats: vmapped(engine.make_evaluate(model, batch_size=config.eval_batch_size, eval_stats=stats),
                                   (0, None, None, 0))
  moving_statistics = config_lib.has_moving_statistics(config)
  return dict(
      model=model, optimizer=optimizer, step_loop=step_loop,
      train=_by_freezing(train_for),
      precise=vmapped(lambda images, state, indices, hparams: precise_state(model, images, state, indices, hparams),
                      (None, 0, 0, 0)),
      batches=jax.jit(jax.vmap(engine.epoch_batches, in_axes=(0, None, None, None)), static_argnums=(2, 3)),
      evaluate={'moving': evaluate('moving'), 'batch': evaluate('batch') if moving_statistics else None},
      shift=vmapped(functools.partial(lane_variance_shift, model), (0, None, 0)),
      moving_statistics=moving_statistics,
  )


RUNS_AXIS = 'runs'


def lane_mesh(num_lanes: int):
  """A 1-D mesh along `RUNS_AXIS` for a group of `num_lanes` runs, or None (one device, one process).

  Its devices: this process's, or every process's devices under
  `jax.distributed` (every process then trains the same group together).
  """
  from jax.sharding import Mesh

  distributed = jax.process_count() > 1
  devices = jax.devices() if distributed else jax.local_devices()
  if not distributed and (len(devices) < 2 or num_lanes < 2):
    return None
  return Mesh(np.asarray(devices), (RUNS_AXIS,))


def lanes(configs: Sequence[Any], dataset, *, cache: dict | None = None, state=None, spread: bool = True) -> Program:
  """K runs with one `config.group_key` as one vmapped program (`cache`: reuse compiled groups).

  With several devices (`spread`), the lanes are sharded over them along a
  `runs` mesh axis: each device trains K/D runs, with no communication per
  step (the lanes are independent; the data is replicated). K that doesn't
  divide by D is padded with copies of the last run, whose results are
  dropped (`Program.padding`): D - 1 idle lanes at most. Under
  `jax.distributed` the mesh spans every process's devices: each process
  passes the same runs, and every metric comes back whole to every process.
  """
  keys = {config_lib.group_key(c) for c in configs}
  if len(keys) != 1:
    raise ValueError(f'the runs of a group must differ only in values ({config_lib.vmapped_fields(configs[0])}); '
                     f'they make groups {sorted(keys)}.')
  first = configs[0]
  num_train = dataset.train_images.shape[0]
  plan = Plan.of(first, num_train)
  cache = {} if cache is None else cache
  mesh = lane_mesh(len(configs)) if spread else None
  key = (keys.pop(), plan.total_steps, mesh)
  if key not in cache:
    cache[key] = _lane_functions(first, plan.total_steps, mesh, dataset.train_images[:1])
  f = cache[key]
  padding = (-len(configs)) % mesh.size if mesh is not None else 0
  configs = list(configs) + [configs[-1]] * padding
  if state is None:
    # A full batch as the init sample: ghost BN checks that its virtual batch divides the batch.
    state = init_lane_states(f['model'], f['optimizer'], configs, dataset.train_images[: first.batch_size])
  hparams = lane_values(configs)
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec

    state, hparams = parallel.put((state, hparams), NamedSharding(mesh, PartitionSpec(RUNS_AXIS)))
    dataset = parallel.replicate(dataset, mesh)
  train = _by_freezing(lambda frozen: _compiled_by_length(f['train'](frozen), dataset.train_images,
                                                          dataset.train_labels))
  evaluators = {stats: fn or f['evaluate']['moving'] for stats, fn in f['evaluate'].items()}

  def train_chunk(state, indices, frozen=False):
    state, metrics = train(frozen)(state, indices, hparams)
    return state, parallel.gather(metrics)

  def evaluate(state, split, stats):
    images, labels = _split(dataset, split)
    return parallel.gather(evaluators[stats](state, images, labels, hparams))

  return Program(
      configs=list(configs), state=state, plan=plan, step_loop=f['step_loop'],
      train_chunk=train_chunk,
      compile_chunk=lambda state, indices, frozen=False: train(frozen).compile_for(state, indices, hparams),
      precise=lambda state, indices: f['precise'](dataset.train_images, state, indices, hparams),
      epoch_batches=lambda state, epoch: f['batches'](state, epoch, num_train, first.batch_size),
      evaluate=evaluate,
      variance_shift=lambda state: parallel.gather(f['shift'](
          state, diagnostics.probe_examples(dataset.test_images, first.virtual_batch_size), hparams)),
      has_moving_statistics=f['moving_statistics'], padding=padding,
  )
