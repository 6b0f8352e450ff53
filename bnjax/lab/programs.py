"""The compiled programs the training loop drives: one run, or K runs vmapped as lanes of one program.

A `Program` is what `bnjax.lab.loop.train` needs, whatever the run:

- `single(config, dataset)`: one run, on one device or data-parallel over
  every device (`engine.make_data_parallel_train_steps`); its metrics get a
  leading lane axis of size 1 so that the loop treats it as a group of one lane.
- `lanes(configs, dataset)`: K runs that differ only in values
  (`config.vmapped_fields`: BN/renorm momentum, rmax, dmax, dropout rate,
  learning rate, seed), their `TrainState`s stacked on a leading axis and
  `engine.over_lanes(engine.make_train_steps(...))` training them in one program.

What the compiled functions compute is `bnjax.lab.engine`'s; this module
builds them from the configs, compiles them and hands them to the loop.

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


def _by_freezing(make: Callable) -> Callable:
  """`frozen -> make(frozen)`, each made once, when first needed (most runs never freeze)."""
  made: dict[bool, Callable] = {}

  def get(frozen: bool):
    if frozen not in made:
      made[frozen] = make(frozen)
    return made[frozen]

  return get


def _with_lane_axis(tree):
  return jax.tree.map(lambda leaf: leaf[None], tree)


def _split(dataset, split: str):
  return {'val': (dataset.val_images, dataset.val_labels), 'test': (dataset.test_images, dataset.test_labels)}[split]


def checked_norm_paths(config, model, sample) -> list | None:
  """The model's norm layers (`models.norm_layer_paths`) where the run needs them (the weight-decay mask), or
  for a model from an import path, checked: a norm asked for and none built is a one-line error."""
  from bnjax.lab import models, registry

  if config.norm_weight_decay and config.model in registry.ENTRIES:
    return None
  paths = models.norm_layer_paths(model, sample)
  models.check_norm_layers(model, paths)
  return paths


def _step_options(config, step_loop: str) -> dict:
  """`engine.make_train_steps`'s options for the run (its frozen-BN switch aside)."""
  return dict(update_stats=config.update_stats, augment=augment_cifar if config.augment else None,
              unroll=step_loop == 'python')


# ----------------------------------------------------------------------------
# One run.


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
  if mesh is not None:
    state = parallel.replicate(state, mesh)
  steps = _single_train_steps(config, model, optimizer, mesh, step_loop)
  train = _by_freezing(lambda frozen: _compiled_by_length(jax.jit(steps(frozen), donate_argnums=0),
                                                          dataset.train_images, dataset.train_labels))
  evaluators = _single_evaluators(config, model, mesh)
  batches = jax.jit(engine.epoch_batches, static_argnums=(2, 3))
  precise = jax.jit(functools.partial(engine.precise_state, model))
  shift = jax.jit(functools.partial(diagnostics.state_variance_shift, model))

  def train_chunk(state, indices, frozen=False):
    state, metrics = train(frozen)(state, indices)
    return state, _with_lane_axis(metrics)

  return Program(
      configs=[config], state=state, plan=plan, step_loop=step_loop, train_chunk=train_chunk,
      compile_chunk=lambda state, indices, frozen=False: train(frozen).compile_for(state, indices),
      precise=lambda state, indices: precise(dataset.train_images, state, indices),
      epoch_batches=lambda state, epoch: batches(state, epoch, num_train, config.batch_size),
      evaluate=lambda state, split, stats: _with_lane_axis(evaluators[stats](state, *_split(dataset, split))),
      variance_shift=lambda state: _with_lane_axis(
          shift(state, diagnostics.probe_examples(dataset.test_images, config.virtual_batch_size), None)),
      has_moving_statistics=config_lib.has_moving_statistics(config),
  )


def _single_train_steps(config, model, optimizer, mesh, step_loop: str) -> Callable:
  """`frozen -> run(state, images, labels, indices)` (not jitted): one device, or data-parallel over `mesh`."""
  options = _step_options(config, step_loop)
  if mesh is None:
    return lambda frozen: engine.make_train_steps(model, optimizer, freeze_norm=frozen, **options)
  return lambda frozen: engine.make_data_parallel_train_steps(
      model, optimizer, mesh, batch_size=config.batch_size, cross_device_stats=config.cross_device_stats,
      freeze_norm=frozen, **options)


def _single_evaluators(config, model, mesh) -> dict[str, Callable]:
  """`{'moving' | 'batch': evaluate(state, images, labels)}`, jitted; without moving statistics both are one."""
  if mesh is None:
    make = functools.partial(engine.make_evaluate, model, batch_size=config.eval_batch_size)
  else:  # each device evaluates its share of the examples
    make = functools.partial(engine.make_data_parallel_evaluate, model, mesh, batch_size=config.eval_batch_size)
  moving = jax.jit(make())
  return {'moving': moving,
          'batch': jax.jit(make(eval_stats='batch')) if config_lib.has_moving_statistics(config) else moving}


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


class GroupFunctions(NamedTuple):
  """The jitted functions of a group (`engine.over_lanes`); they depend only on the group key and the mesh."""

  model: Any
  optimizer: optax.GradientTransformation
  step_loop: str
  train: Callable  # frozen -> the group's steps
  precise: Callable
  batches: Callable
  evaluate: dict[str, Callable]  # 'moving' | 'batch' (one function without moving statistics)
  shift: Callable
  moving_statistics: bool


def group_functions(config, total_steps: int, mesh=None, sample=None) -> GroupFunctions:
  """A group's functions, each over its K lanes (with a `mesh`, each device runs its own lanes)."""
  model = build.model(config)
  optimizer = group_optimizer(config, total_steps, checked_norm_paths(config, model, sample))
  step_loop = engine.step_loop_for(model, config.step_loop, sample=sample)
  options = _step_options(config, step_loop)
  train_for = lambda frozen: engine.over_lanes(engine.make_train_steps(model, optimizer, freeze_norm=frozen, **options),
                                               (0, None, None, 0, 0), mesh, donate_argnums=0)
  evaluate = lambda stats: engine.over_lanes(
      engine.make_evaluate(model, batch_size=config.eval_batch_size, eval_stats=stats), (0, None, None, 0), mesh)
  moving_statistics = config_lib.has_moving_statistics(config)
  moving = evaluate('moving')
  return GroupFunctions(
      model=model, optimizer=optimizer, step_loop=step_loop, train=_by_freezing(train_for),
      precise=engine.over_lanes(functools.partial(engine.precise_state, model), (None, 0, 0, 0), mesh),
      batches=jax.jit(jax.vmap(engine.epoch_batches, in_axes=(0, None, None, None)), static_argnums=(2, 3)),
      evaluate={'moving': moving, 'batch': evaluate('batch') if moving_statistics else moving},
      shift=engine.over_lanes(functools.partial(diagnostics.state_variance_shift, model), (0, None, 0), mesh),
      moving_statistics=moving_statistics,
  )


def _group_key(configs: Sequence[Any]) -> str:
  """The one `config.group_key` of the runs; a one-line error when they make several groups."""
  keys = {config_lib.group_key(c) for c in configs}
  if len(keys) != 1:
    raise ValueError(f'the runs of a group must differ only in values ({config_lib.vmapped_fields(configs[0])}); '
                     f'they make groups {sorted(keys)}.')
  return keys.pop()


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
  group = _group_key(configs)
  first, num_train = configs[0], dataset.train_images.shape[0]
  plan = Plan.of(first, num_train)
  cache = {} if cache is None else cache
  mesh = parallel.lane_mesh(len(configs)) if spread else None
  key = (group, plan.total_steps, mesh)
  if key not in cache:
    cache[key] = group_functions(first, plan.total_steps, mesh, dataset.train_images[:1])
  f = cache[key]
  padding = (-len(configs)) % mesh.size if mesh is not None else 0
  configs = list(configs) + [configs[-1]] * padding
  if state is None:
    # A full batch as the init sample: ghost BN checks that its virtual batch divides the batch.
    state = init_lane_states(f.model, f.optimizer, configs, dataset.train_images[: first.batch_size])
  hparams = lane_values(configs)
  if mesh is not None:
    state, hparams = parallel.split_lanes((state, hparams), mesh)
    dataset = parallel.replicate(dataset, mesh)
  train = _by_freezing(lambda frozen: _compiled_by_length(f.train(frozen), dataset.train_images,
                                                          dataset.train_labels))

  def train_chunk(state, indices, frozen=False):
    state, metrics = train(frozen)(state, indices, hparams)
    return state, parallel.gather(metrics)

  return Program(
      configs=configs, state=state, plan=plan, step_loop=f.step_loop, train_chunk=train_chunk,
      compile_chunk=lambda state, indices, frozen=False: train(frozen).compile_for(state, indices, hparams),
      precise=lambda state, indices: f.precise(dataset.train_images, state, indices, hparams),
      epoch_batches=lambda state, epoch: f.batches(state, epoch, num_train, first.batch_size),
      evaluate=lambda state, split, stats: parallel.gather(f.evaluate[stats](state, *_split(dataset, split), hparams)),
      variance_shift=lambda state: parallel.gather(f.shift(
          state, diagnostics.probe_examples(dataset.test_images, first.virtual_batch_size), hparams)),
      has_moving_statistics=f.moving_statistics, padding=padding,
  )
