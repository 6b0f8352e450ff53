"""Sweeps: grids of `TrainConfig`s, trained K at a time as one vmapped program, resumable.

A sweep is a list of configs (experiments are data). Runs that differ only in
*values* (`VALUE_FIELDS`: BN/renorm momentum, rmax, dmax, dropout rate,
learning rate, seed) share one group: their K `TrainState`s are stacked along
a leading axis and `jax.vmap(engine.make_train_steps(...))` trains them in one
compiled program, one pass of the host loop, K models per step. Everything
else (batch size, dropout placement, model, norm kind, schedules) changes
shapes or structure and makes a separate group. On CPU a convolutional
model's group trains one run at a time (`one_run_per_conv_group`).

    configs, notes = expand_grid(TrainConfig(epochs=1), {'momentum': [0.9, 0.99], 'seed': [0, 1]})
    run_sweep(configs, 'runs/sweeps/demo')      # -> runs/<run_id>.json, results.csv, report.md

How each value reaches its lane:
- model values (`models.HPARAMS`) go through `apply(..., hparams=...)`, one
  number per lane; only those the model holds as plain numbers (a momentum
  *schedule*, or renorm's warm-up clipping, is structure);
- the learning rate: every schedule of `build.learning_rate` is the peak times
  a shape, so a group's optimizer is `build.optimizer` at peak 1 chained with
  `optax.inject_hyperparams(optax.scale)`, whose `step_size` holds each lane's
  peak (a callable injected learning rate is re-evaluated every step, so
  writing into `hyperparams['learning_rate']` would not last);
- the seed: each lane's `TrainState.rng` initializes, shuffles and drops out
  exactly as the sequential run with that seed would.

Safety: each finished run is one JSON file `runs/<run_id>.json`, written
atomically; `results.csv` is regenerated from those files. Re-running a sweep
skips run ids already there (except runs recorded as errors: they run again); a kill loses only the group in flight; a lane
whose loss becomes non-finite is recorded as diverged (NaNs stay in their
lane); a group that raises records each of its runs with the error.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import math
import os
import time
import traceback
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from bnjax.lab.config import FIELDS, TrainConfig, validate

STATUS_COMPLETED = 'completed'  # the same words as bnjax.lab.experiment
STATUS_DIVERGED = 'diverged'
STATUS_ERROR = 'error'

# Fields that are values of one compiled program (when live, see `vmapped_fields`).
VALUE_FIELDS = ('momentum', 'renorm_momentum', 'rmax', 'dmax', 'dropout_rate', 'learning_rate', 'seed')
# Fields that do not change what a run computes: not part of its identity.
NON_IDENTITY_FIELDS = ('workdir', 'data_dir', 'checkpoint_every', 'progress_updates', 'step_loop')
RENORM_FIELDS = ('renorm_momentum', 'rmax', 'dmax', 'renorm_clipping', 'renorm_warmup_steps',
                 'rmax_end_step', 'dmax_end_step')
MOMENTUM_FIELDS = ('momentum', 'momentum_schedule', 'momentum_decay_rate', 'momentum_decay_steps',
                   'momentum_max', 'debias')

METRIC_COLUMNS = (
    'status', 'final_val_accuracy', 'best_val_accuracy', 'best_epoch', 'final_train_accuracy',
    'test_accuracy_moving_stats', 'test_accuracy_batch_stats', 'train_val_gap', 'stats_gap',
    'variance_shift', 'moving_variance_ratio',  # bnjax.lab.diagnostics: geometric means over the norm layers
    'epochs_completed', 'diverged_epoch', 'seconds', 'group_seconds', 'group_size', 'error',
)
CURVE_COLUMN = 'val_accuracy_curve'  # JSON list: validation accuracy per epoch
RESULT_COLUMNS = ('run_id', 'group_id') + METRIC_COLUMNS + FIELDS + (CURVE_COLUMN,)


class Interrupted(RuntimeError):
  """Raised after `interrupt_after_groups` groups were written (fault injection for resume tests)."""


# ----------------------------------------------------------------------------
# Grids: configs from values.


def parse_values(field: str, text: str) -> list:
  """`'0.9,0.99'` -> `[0.9, 0.99]`, typed after `TrainConfig.<field>` ('none' unsets an optional number)."""
  if field not in FIELDS:
    raise ValueError(f'unknown setting {field!r}; the settings are {list(FIELDS)}.')
  kind = typing.get_type_hints(TrainConfig)[field]
  values = []
  for item in (part.strip() for part in str(text).split(',')):
    if kind is bool:
      if item.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'--{field}={item!r}: expected true or false.')
      values.append(item.lower() in ('true', '1'))
    elif kind in (int, float, int | None, float | None):
      if item.lower() == 'none' and kind in (int | None, float | None):
        values.append(None)
        continue
      number = float(item)
      values.append(int(number) if kind in (int, int | None) and number == int(number) else number)
    else:
      values.append(item)
  return values


def canonical(config: TrainConfig) -> TrainConfig:
  """The same run with options it does not use at their defaults (so that equal runs compare equal).

  Renorm options without norm=renorm, the momentum of an inverse-decay
  schedule, every BN option without BN, a dropout rate without dropout.
  """
  defaults = TrainConfig()
  reset = []
  if config.norm != 'renorm':
    reset += RENORM_FIELDS
  if config.norm == 'none':
    reset += MOMENTUM_FIELDS
  elif config.momentum_schedule == 'inverse_decay':
    reset.append('momentum')
  if config.momentum_schedule != 'inverse_decay':
    reset += ('momentum_decay_rate', 'momentum_decay_steps', 'momentum_max')
  if config.renorm_clipping != 'warmup':
    reset += ('renorm_warmup_steps', 'rmax_end_step', 'dmax_end_step')
  if config.dropout_placement == 'none':
    reset.append('dropout_rate')
  if config.norm not in ('ghost', 'renorm'):
    reset.append('virtual_batch_size')
  return dataclasses.replace(config, **{name: getattr(defaults, name) for name in reset})


def run_id(config: TrainConfig) -> str:
  """12 hex digits of the hash of the resolved config, less the fields that don't change the result."""
  identity = {k: v for k, v in canonical(config).to_dict().items() if k not in NON_IDENTITY_FIELDS}
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def expand_grid(
    base: TrainConfig, grid: dict[str, Sequence], finalize: Callable[[TrainConfig], TrainConfig] | None = None
) -> tuple[list[TrainConfig], list[str]]:
  """Every combination of `grid`'s values over `base`, canonical, validated and deduplicated.

  Args:
    base: the settings every run shares.
    grid: `{field: [values]}`, e.g. `{'momentum': [0.9, 0.99], 'norm': ['bn', 'renorm']}`.
    finalize: optional `config -> config` applied to each combination (a
      preset's derived settings, e.g. a schedule scaled to the run length).

  Returns:
    `(configs, notes)`: the distinct valid runs in grid order, and one line
    per combination skipped as invalid or merged as a duplicate (e.g. rmax
    values of runs without renorm).
  """
  unknown = sorted(set(grid) - set(FIELDS))
  if unknown:
    raise ValueError(f'unknown settings {unknown}; the settings are {list(FIELDS)}.')
  names = list(grid)
  configs, notes, seen = [], [], {}
  for values in itertools.product(*(grid[name] for name in names)):
    combination = dict(zip(names, values))
    try:
      config = canonical(dataclasses.replace(base, **combination))
      if finalize is not None:
        config = canonical(finalize(config))
      validate(config)
    except (ValueError, TypeError) as error:
      notes.append(f'skipped {combination}: {error}')
      continue
    key = run_id(config)
    if key in seen:
      notes.append(f'merged {combination} into {seen[key]} (the differing options are unused by that run)')
      continue
    seen[key] = combination
    configs.append(config)
  return configs, notes


# ----------------------------------------------------------------------------
# Groups: runs one vmapped program can train together.


def model_hparams(config: TrainConfig) -> tuple[str, ...]:
  """The `models.HPARAMS` this run's model holds as plain numbers: each lane sets its own via `hparams`."""
  names = []
  if config.norm != 'none' and config.momentum_schedule == 'constant':
    names.append('momentum')
  if config.norm == 'renorm':
    names.append('renorm_momentum')
    if config.renorm_clipping == 'constant':
      names += ['rmax', 'dmax']
  if config.dropout_placement != 'none':
    names.append('dropout_rate')
  return tuple(names)


def vmapped_fields(config: TrainConfig) -> tuple[str, ...]:
  """The fields lanes of this run's group may differ in: its live model values, learning rate, seed."""
  return model_hparams(config) + ('learning_rate', 'seed')


def group_key(config: TrainConfig) -> str:
  """Runs with equal keys differ only in values: one compiled program trains them together."""
  free = set(vmapped_fields(config)) | {'workdir', 'checkpoint_every', 'progress_updates'}
  fixed = {k: v for k, v in canonical(config).to_dict().items() if k not in free}
  return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:8]


def group_runs(configs: Iterable[TrainConfig], max_group_size: int | None = None) -> list[list[TrainConfig]]:
  """Configs grouped by `group_key` (order of first appearance), groups cut to `max_group_size` lanes."""
  groups: dict[str, list[TrainConfig]] = {}
  for config in configs:
    groups.setdefault(group_key(config), []).append(config)
  cut = []
  for members in groups.values():
    size = max_group_size or len(members)
    cut += [members[i : i + size] for i in range(0, len(members), size)]
  return cut


def one_run_per_conv_group(groups: Sequence[Sequence[TrainConfig]], backend: str) -> list[list[TrainConfig]]:
  """On CPU, splits the groups of convolutional models into single runs (they still share one compile).

  XLA:CPU runs a vmapped convolution as a grouped convolution, far slower:
  cnn_seed at batch 32 took 681 ms per step for 2 vmapped runs vs 128 ms for
  one. Other backends and dense models keep their groups.
  """
  if backend != 'cpu':
    return [list(g) for g in groups]
  from bnjax.lab import models

  has_conv = lambda config: models.has_convolutions(models.get(config.model))
  return [part for g in groups for part in ([[c] for c in g] if has_conv(g[0]) else [list(g)])]


def describe_groups(groups: Sequence[Sequence[TrainConfig]]) -> str:
  """The dry-run listing: each group, what its lanes vary, and each run's id and values."""
  lines = []
  for index, members in enumerate(groups):
    first = members[0]
    varying = [f for f in FIELDS if len({getattr(c, f) for c in members}) > 1]
    structure = {f: getattr(first, f) for f in ('model', 'norm', 'batch_size', 'dropout_placement',
                                                 'momentum_schedule', 'optimizer', 'lr_schedule')}
    lines.append(f'group {index + 1} [{group_key(first)}]: {len(members)} run(s), one program; '
                 f'{" ".join(f"{k}={v}" for k, v in structure.items())}; lanes vary: {", ".join(varying) or "-"}')
    for config in members:
      values = ' '.join(f'{f}={getattr(config, f)}' for f in vmapped_fields(config))
      lines.append(f'  {run_id(config)}  {values}')
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# Training a group of K runs as one program.


def group_optimizer(config: TrainConfig, total_steps: int):
  """`build.optimizer` at peak learning rate 1, then a per-lane injected `scale` (the peak)."""
  import optax

  from bnjax.lab import build

  unit = build.optimizer(dataclasses.replace(config, learning_rate=1.0), total_steps)
  return optax.chain(unit, optax.inject_hyperparams(optax.scale)(step_size=1.0))


def init_group_states(model, optimizer, configs: Sequence[TrainConfig], sample):
  """K `TrainState`s stacked on a leading axis: `engine.init_train_state` per seed, each lane's peak lr."""
  import jax
  import jax.numpy as jnp

  from bnjax.lab import engine

  seeds = jnp.asarray([c.seed for c in configs], jnp.int32)
  states = jax.jit(jax.vmap(lambda seed: engine.init_train_state(model, optimizer, seed, sample)))(seeds)
  unit_state, scale_state = states.opt_state
  peaks = jnp.asarray([c.learning_rate for c in configs], jnp.float32)
  scale_state = scale_state._replace(hyperparams={**scale_state.hyperparams, 'step_size': peaks})
  return states._replace(opt_state=(unit_state, scale_state))


def lane_values(configs: Sequence[TrainConfig]) -> dict[str, Any]:
  """`hparams` of the group: `{name: [K] float32}` for the model's live values."""
  import jax.numpy as jnp

  return {name: jnp.asarray([getattr(c, name) for c in configs], jnp.float32) for name in model_hparams(configs[0])}


def _programs(config: TrainConfig, total_steps: int, cache: dict):
  """The jitted vmapped functions of a group (cached by group key: lanes and later groups reuse them)."""
  key = (group_key(config), total_steps)
  if key in cache:
    return cache[key]
  import jax

  from bnjax.lab import build, engine
  from bnjax.lab.data import augment_cifar

  model = build.model(config)
  optimizer = group_optimizer(config, total_steps)
  step_loop = engine.step_loop_for(model, config.step_loop)
  steps = engine.make_train_steps(model, optimizer, update_stats=config.update_stats,
                                  augment=augment_cifar if config.augment else None, unroll=step_loop == 'python')
  lanes = lambda fn, axes: jax.jit(jax.vmap(fn, in_axes=axes))
  evaluate = lambda mode: lanes(engine.make_evaluate(model, batch_size=config.eval_batch_size, batch_stats_mode=mode),
                                (0, None, None, 0))
  programs = dict(
      model=model, optimizer=optimizer, step_loop=step_loop,
      train=jax.jit(jax.vmap(steps, in_axes=(0, None, None, 0, 0)), donate_argnums=0),
      batches=jax.jit(jax.vmap(engine.epoch_batches, in_axes=(0, None, None, None)), static_argnums=(2, 3)),
      eval_moving=evaluate(False),
      eval_batch=evaluate(True) if config.norm != 'none' else None,
      shift=lanes(functools.partial(lane_variance_shift, model), (0, None, 0)),
  )
  cache[key] = programs
  return programs


def lane_variance_shift(model, state, images, hparams):
  """`diagnostics.variance_shift` of one run's state (the dropout key derives from its seed)."""
  import jax

  from bnjax.lab import diagnostics

  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  rng = jax.random.fold_in(state.rng, diagnostics.SHIFT_STREAM)
  return diagnostics.variance_shift(model, variables, images, rng, hparams)


def train_group(configs: Sequence[TrainConfig], dataset, *, cache: dict | None = None,
                log: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], Any]:
  """Trains K runs that differ only in `vmapped_fields` as one vmapped program.

  Args:
    configs: K validated configs with one `group_key`.
    dataset: a `bnjax.lab.data.Dataset` with device arrays, shared by the lanes.
    cache: compiled programs by group key, reused across calls when given.

  Returns:
    `(records, states)`: per run the summary (the fields of `experiment.run`'s
    summary, plus `history` [per epoch: train/val loss and accuracy] and
    `diverged_epoch`), and the final stacked `TrainState` (leading axis K).
  """
  import jax
  import numpy as np

  from bnjax.lab import build, diagnostics, engine

  keys = {group_key(c) for c in configs}
  if len(keys) != 1:
    raise ValueError(f'the configs of a group must differ only in {VALUE_FIELDS}; they make groups {sorted(keys)}.')
  first = configs[0]
  num_train = dataset.train_images.shape[0]
  steps_per_epoch = build.steps_per_epoch(first, num_train)
  total_steps = build.total_steps(first, num_train)
  p = _programs(first, total_steps, {} if cache is None else cache)
  # A full batch as the init sample: ghost BN checks that its virtual batch divides the batch.
  states = init_group_states(p['model'], p['optimizer'], configs, dataset.train_images[: first.batch_size])
  hparams = lane_values(configs)
  # One jitted call per epoch (scan), or per step on CPU for conv models (engine.step_loop_for).
  chunk = 1 if p['step_loop'] == 'python' else steps_per_epoch
  eval_val = p['eval_batch'] if first.eval_stats == 'batch' else p['eval_moving']
  k = len(configs)
  histories: list[list[dict]] = [[] for _ in range(k)]
  diverged_epoch: list[int | None] = [None] * k
  for epoch in range(build.num_epochs(first, num_train)):
    steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
    batches = p['batches'](states, epoch, num_train, first.batch_size)[:, :steps]
    totals = None
    for begin in range(0, steps, chunk):
      states, part = p['train'](states, dataset.train_images, dataset.train_labels,
                                batches[:, begin : begin + chunk], hparams)
      totals = part if totals is None else engine.Metrics(*(a + b for a, b in zip(totals, part)))
    val = eval_val(states, dataset.val_images, dataset.val_labels, hparams)
    train_loss, train_acc = np.asarray(totals.mean_loss()), np.asarray(totals.accuracy())
    val_loss, val_acc = np.asarray(val.mean_loss()), np.asarray(val.accuracy())
    for lane in range(k):
      if diverged_epoch[lane] is not None:
        continue
      if not math.isfinite(float(train_loss[lane])):
        diverged_epoch[lane] = epoch + 1
        log(f'run {run_id(configs[lane])} diverged in epoch {epoch + 1}: training loss {float(train_loss[lane])}')
        continue
      histories[lane].append({
          'epoch': epoch + 1, 'step': (epoch * steps_per_epoch) + steps,
          'train_loss': float(train_loss[lane]), 'train_accuracy': float(train_acc[lane]),
          'val_loss': float(val_loss[lane]), 'val_accuracy': float(val_acc[lane]),
      })
    if all(d is not None for d in diverged_epoch):
      break
  test_moving = p['eval_moving'](states, dataset.test_images, dataset.test_labels, hparams)
  test_batch = (p['eval_batch'] or p['eval_moving'])(states, dataset.test_images, dataset.test_labels, hparams)
  shift = p['shift'](states, diagnostics.probe_examples(dataset.test_images, first.virtual_batch_size), hparams)
  records = []
  for lane, config in enumerate(configs):
    history = histories[lane]
    record: dict[str, Any] = {'epochs_completed': len(history), 'history': history,
                              'diverged_epoch': diverged_epoch[lane], 'step_loop': p['step_loop']}
    if diverged_epoch[lane] is not None:
      record.update(status=STATUS_DIVERGED,
                    message=f'diverged in epoch {diverged_epoch[lane]}: training loss is not finite')
    else:
      moving, batch = float(test_moving.accuracy()[lane]), float(test_batch.accuracy()[lane])
      record.update(status=STATUS_COMPLETED, test_accuracy_moving_stats=moving,
                    test_accuracy_batch_stats=batch if first.norm != 'none' else None,
                    test_accuracy=batch if first.eval_stats == 'batch' else moving,
                    test_loss=float((test_batch if first.eval_stats == 'batch' else test_moving).mean_loss()[lane]),
                    stats_gap=batch - moving if first.norm != 'none' else None)
      record.update(diagnostics.shift_summary(jax.tree.map(lambda v: v[lane], shift)))
    if history:
      best = max(history, key=lambda m: m['val_accuracy'])
      record.update(final_val_accuracy=history[-1]['val_accuracy'], best_val_accuracy=best['val_accuracy'],
                    best_epoch=best['epoch'], final_train_accuracy=history[-1]['train_accuracy'],
                    train_val_gap=history[-1]['train_accuracy'] - history[-1]['val_accuracy'])
    records.append(record)
  return records, states


# ----------------------------------------------------------------------------
# The sweep: groups -> one atomic JSON per run -> results.csv -> report.


def finished_runs(sweep_dir: str | Path) -> dict[str, dict]:
  """`{run_id: record}` of the runs already written in `sweep_dir/runs/`."""
  records = {}
  for path in sorted(Path(sweep_dir, 'runs').glob('*.json')):
    try:
      records[path.stem] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
      continue  # not ours, or unreadable: the run is redone
  return records


def result_row(record: dict) -> dict[str, Any]:
  """One row of results.csv: ids, metrics, every hyperparameter, the validation curve."""
  row = {column: record.get(column) for column in ('run_id', 'group_id') + METRIC_COLUMNS}
  row.update(record['config'])
  row[CURVE_COLUMN] = json.dumps([round(m['val_accuracy'], 6) for m in record.get('history', [])])
  return row


def write_results(sweep_dir: str | Path, order: Sequence[str] | None = None) -> Path:
  """Regenerates `results.csv` from `runs/*.json` (atomically), rows in `order` of run ids where given."""
  records = finished_runs(sweep_dir)
  ids = [i for i in (order or []) if i in records] + sorted(set(records) - set(order or []))
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, extrasaction='ignore')
  writer.writeheader()
  for i in ids:
    writer.writerow({k: '' if v is None else v for k, v in result_row(records[i]).items()})
  path = Path(sweep_dir, 'results.csv')
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(buffer.getvalue())
  os.replace(tmp, path)
  return path


def _error_records(configs: Sequence[TrainConfig], error: BaseException) -> list[dict]:
  text = f'{type(error).__name__}: {error}'.strip()
  tail = traceback.format_exception(error)[-3:]
  return [{'status': STATUS_ERROR, 'error': text, 'traceback': ''.join(tail), 'history': []} for _ in configs]


def run_sweep(
    configs: Sequence[TrainConfig],
    sweep_dir: str | Path,
    *,
    command: str = '',
    max_group_size: int | None = None,
    interrupt_after_groups: int | None = None,
    report: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict]:
  """Trains every config not yet finished in `sweep_dir`, group by group; returns all records.

  Args:
    configs: the sweep (e.g. from `expand_grid`).
    sweep_dir: its folder: `sweep.json`, `runs/<run_id>.json`, `results.csv`, `report.md`.
    command: the command line that produced the sweep (written in the report).
    max_group_size: lanes per compiled program at most (memory); None: no cap.
    interrupt_after_groups: fault injection: raise `Interrupted` after this
      many groups were written.
    report: write `report.md` and its plots at the end.
  """
  import jax

  from bnjax.lab import build
  from bnjax.lab.experiment import write_json  # atomic: tmp file + os.replace

  sweep_dir = Path(sweep_dir)
  (sweep_dir / 'runs').mkdir(parents=True, exist_ok=True)
  ids = [run_id(c) for c in configs]
  write_json(sweep_dir / 'sweep.json', {'command': command, 'run_ids': ids})
  done = finished_runs(sweep_dir)
  # Runs that raised are tried again (the cause may be fixed); completed and diverged ones are kept.
  todo = [c for c, i in zip(configs, ids) if done.get(i, {}).get('status', STATUS_ERROR) == STATUS_ERROR]
  groups = one_run_per_conv_group(group_runs(todo, max_group_size), jax.default_backend())
  log(f'{len(configs)} runs: {len(configs) - len(todo)} already finished, {len(todo)} to train in {len(groups)} group(s)')
  datasets: dict[tuple, Any] = {}
  cache: dict = {}
  for index, members in enumerate(groups):
    timer = time.perf_counter()
    try:
      key = build.dataset_key(members[0])
      if key not in datasets:
        datasets[key] = build.dataset(members[0], put=jax.device_put)
      records, _ = train_group(members, datasets[key], cache=cache, log=log)
    except Exception as error:  # noqa: BLE001  (a failing group is recorded; the sweep goes on)
      records = _error_records(members, error)
      log(f'group {index + 1} failed: {records[0]["error"]}')
    seconds = time.perf_counter() - timer
    for config, record in zip(members, records):
      record.update(run_id=run_id(config), group_id=group_key(config), config=config.to_dict(),
                    seconds=seconds / len(members), group_seconds=seconds, group_size=len(members))
      write_json(sweep_dir / 'runs' / f'{record["run_id"]}.json', record)
    write_results(sweep_dir, ids)
    summary = ', '.join(f'{r["status"]}' if r.get('test_accuracy_moving_stats') is None
                        else f'{r["test_accuracy_moving_stats"]:.4f}' for r in records)
    log(f'group {index + 1}/{len(groups)}: {len(members)} run(s) in {seconds:.1f}s; test acc (moving stats): {summary}')
    if interrupt_after_groups is not None and index + 1 == interrupt_after_groups and index + 1 < len(groups):
      raise Interrupted(f'interrupted after group {index + 1} (fault injection)')
  write_results(sweep_dir, ids)
  if report:
    from bnjax.lab import report as report_lib

    report_lib.write_report(sweep_dir / 'results.csv', command=command, log=log)
  done = finished_runs(sweep_dir)
  return [done[i] for i in ids if i in done]


# ----------------------------------------------------------------------------
# Presets: the source material's studies, with CPU-sized budgets.


def renorm_warmup_scaled(config: TrainConfig) -> TrainConfig:
  """The Batch Renorm paper's clipping schedule (plain BN for 5k steps, rmax at 40k, dmax at 25k of
  its 40k+), scaled to this run's length: 1/8, 1 and 5/8 of the run."""
  if config.norm != 'renorm' or config.steps is None:
    return config
  return dataclasses.replace(config, renorm_clipping='warmup', renorm_warmup_steps=config.steps // 8,
                             rmax_end_step=config.steps, dmax_end_step=config.steps * 5 // 8)


MOMENTA = [0.6, 0.75, 0.85, 0.9, 0.99]
_MNIST = dict(dataset='mnist', model='mlp_seed', optimizer='adam', learning_rate=1e-3, validation='test')

PRESETS: dict[str, dict[str, Any]] = {
    'momentum': dict(
        description='BN momentum on the MNIST MLP at batch 500: 0.6..0.99 and the inverse-decay schedule; '
                    '2 epochs, 3 seeds (one program of 15 lanes + one of 3). GPU: --epochs=20.',
        base=dict(_MNIST, norm='bn', batch_size=500, epochs=2),
        grid=dict(momentum=MOMENTA, momentum_schedule=['constant', 'inverse_decay'], seed=[0, 1, 2]),
    ),
    'batch_size': dict(
        description='Batch size 32..5000 with BN (momentum 0.99), MNIST MLP, 1 epoch, 2 seeds. GPU: --epochs=20.',
        base=dict(_MNIST, norm='bn', epochs=1),
        grid=dict(batch_size=[32, 128, 500, 5000], seed=[0, 1]),
    ),
    'momentum_batch_size': dict(
        description="The rule of thumb: small batch -> high momentum, large batch -> low momentum (or "
                    'inverse decay). Momentum 0.6..0.99 + inverse decay x batch 32..5000, MNIST MLP, 1 epoch, '
                    '2 seeds: 4 programs of 12 lanes. GPU: --epochs=20 --seeds... .',
        base=dict(_MNIST, norm='bn', epochs=1),
        grid=dict(momentum=MOMENTA, momentum_schedule=['constant', 'inverse_decay'],
                  batch_size=[32, 128, 500, 5000], seed=[0, 1]),
    ),
    'dropout': dict(
        description='Dropout placement (none, before_norm: the variance shift, after_norm, end) x rate 0.2/0.5 '
                    'x norm none/bn, MNIST MLP, batch 500, 2 epochs, 2 seeds. GPU: --epochs=20.',
        base=dict(_MNIST, batch_size=500, epochs=2),
        grid=dict(dropout_placement=['none', 'before_norm', 'after_norm', 'end'], dropout_rate=[0.2, 0.5],
                  norm=['none', 'bn'], seed=[0, 1]),
    ),
    'renorm': dict(
        description='Batch renorm vs BN vs none at small batches (2, 4, 8, 32), MNIST MLP, 600 steps each '
                    "(renorm with the paper's clipping warm-up scaled to the run), 2 seeds. GPU: --steps=20000.",
        base=dict(_MNIST, steps=600),
        grid=dict(batch_size=[2, 4, 8, 32], norm=['bn', 'renorm', 'none'], seed=[0, 1]),
        finalize=renorm_warmup_scaled,
    ),
}


def preset_grid(name: str, overrides: dict[str, Sequence] | None = None) -> tuple[TrainConfig, dict, Any]:
  """`(base, grid, finalize)` of a preset; `overrides` (`{field: [values]}`) replace its axes and settings.

  A one-value override sets the base; more values make (or replace) an axis.
  """
  if name not in PRESETS:
    raise ValueError(f'--preset={name!r} is invalid: expected one of {", ".join(PRESETS)}.')
  preset = PRESETS[name]
  base = dict(preset['base'])
  grid = {k: list(v) for k, v in preset['grid'].items()}
  for field, values in (overrides or {}).items():
    grid.pop(field, None)
    if len(values) == 1:
      base[field] = values[0]
    else:
      grid[field] = list(values)
  return TrainConfig(**base), grid, preset.get('finalize')
