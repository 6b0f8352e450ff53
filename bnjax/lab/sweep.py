"""Sweeps: grids of `TrainConfig`s, trained K at a time as one vmapped program, resumable.

A sweep is a list of configs (experiments are data). Runs that differ only in
*values* (`config.vmapped_fields`: BN/renorm momentum, rmax, dmax, dropout
rate, learning rate, seed) share one group: their K `TrainState`s are stacked along
a leading axis and `engine.over_lanes(engine.make_train_steps(...))` trains them in one
compiled program, one pass of the host loop, K models per step. Everything
else (batch size, dropout placement, model, norm kind, schedules) changes
shapes or structure and makes a separate group. On CPU a convolutional
model's group trains one run at a time (`one_run_per_conv_group`).

    configs, notes = expand_grid(TrainConfig(epochs=1), {'momentum': [0.9, 0.99], 'seed': [0, 1]})
    run_sweep(configs, 'runs/sweeps/demo')      # -> runs/<run_id>.json, results.csv, report.md

Which options are values and which are structure is said by the option
table (`bnjax.lab.options`); `bnjax.lab.programs.lanes` says how each value
reaches its lane; `bnjax.lab.loop` trains the group like any run.

Safety: each finished run is one JSON file `runs/<run_id>.json`, written
atomically, beside its folder `runs/<run_id>/` (metrics.jsonl, TensorBoard
events: `tensorboard --logdir <sweep_dir>` compares the lanes); a group
checkpoints after every epoch (`groups/<id>/`), so a kill loses at most an
epoch, and keeps them when it fails (a full disk): its re-run resumes there;
`results.csv` is regenerated from those files. Re-running a sweep
skips run ids already there (except runs recorded as errors: they run again); a kill loses only the group in flight; a lane
whose loss becomes non-finite is recorded as diverged (NaNs stay in their
lane); a group that raises records each of its runs with the error.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import itertools
import json
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from bnjax.lab import loop, parallel, storage
from bnjax.lab.config import (FIELDS, TrainConfig, canonical, dataset_key, group_key, identity, run_id, unchecked,
                              uses, validate, vmapped_fields, with_model_defaults)
from bnjax.lab.options import OPTIONS, STRUCTURE

STATUS_ERROR = 'error'  # a run whose group raised (its record holds the error); the next sweep tries it again

METRIC_COLUMNS = (
    'status', 'final_val_accuracy', 'best_val_accuracy', 'best_epoch', 'final_train_accuracy',
    'test_accuracy_moving_stats', 'test_accuracy_batch_stats', 'test_accuracy_precise_stats', 'train_val_gap',
    'stats_gap',
    'variance_shift', 'moving_variance_ratio',  # bnjax.lab.diagnostics: geometric means over the norm layers
    'epochs_completed', 'diverged_epoch', 'seconds', 'group_seconds', 'group_size', 'error',
)
CURVE_COLUMN = 'val_accuracy_curve'  # JSON list: validation accuracy per epoch
RESULT_COLUMNS = ('run_id', 'group_id') + METRIC_COLUMNS + FIELDS + (CURVE_COLUMN,)


# Seconds without a heartbeat after which a group's claim is taken over (its worker died).
CLAIM_TIMEOUT = 600.0


class Interrupted(RuntimeError):
  """Raised after `interrupt_after_groups` groups were written (fault injection for resume tests)."""


class ClaimLost(RuntimeError):
  """This worker's claim on the group it trains was taken over (it stalled past the claim timeout): stop writing."""


# ----------------------------------------------------------------------------
# Grids: configs from values.


def expand_grid(
    base: TrainConfig, grid: dict[str, Sequence], finalize: Callable[[TrainConfig], TrainConfig] | None = None,
    given: Iterable[str] | None = None,
) -> tuple[list[TrainConfig], list[str]]:
  """Every combination of `grid`'s values over `base`, canonical, validated and deduplicated.

  Args:
    base: the settings every run shares.
    grid: `{field: [values]}`, e.g. `{'momentum': [0.9, 0.99], 'norm': ['bn', 'renorm']}`.
    finalize: optional `config -> config` applied to each combination (a
      preset's derived settings, e.g. a schedule scaled to the run length).
    given: the names of the settings given (on the command line): with it,
      each combination's model's own training settings are the defaults of
      the others (`config.with_model_defaults`).

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
      config = dataclasses.replace(base, **combination)
      if given is not None:
        config = unchecked(with_model_defaults({name: getattr(config, name) for name in set(given) | set(grid)}))
      config = canonical(config)
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


def one_run_per_conv_group(groups: Sequence[Sequence[TrainConfig]], backend: str,
                           num_devices: int = 1) -> list[list[TrainConfig]]:
  """On CPU, splits the groups of convolutional models into one run per device (they still share one compile).

  XLA:CPU runs a vmapped convolution as a grouped convolution, far slower:
  cifar_cnn at batch 32 took 681 ms per step for 2 vmapped runs vs 128 ms for
  one. With `num_devices` CPU devices a part has one lane per device (each
  device runs its lane's convolution alone). Other backends and dense
  models keep their groups.
  """
  if backend != 'cpu':
    return [list(g) for g in groups]
  import jax
  import jax.numpy as jnp

  from bnjax.lab import build, models

  has_conv = lambda config: models.has_convolutions(
      build.model(config), jax.ShapeDtypeStruct(models.SAMPLE_SHAPES[config.dataset], jnp.float32))
  per_device = lambda g: [list(g[i : i + num_devices]) for i in range(0, len(g), num_devices)]
  return [part for g in groups for part in (per_device(g) if has_conv(g[0]) else [list(g)])]


def describe_groups(groups: Sequence[Sequence[TrainConfig]]) -> str:
  """The dry-run listing: each group, the structure that makes it one, what its lanes vary, each run's values."""
  firsts = [members[0] for members in groups]
  between = {name for name, option in OPTIONS.items()
             if option.role == STRUCTURE and len({getattr(c, name) for c in firsts}) > 1}
  lines = []
  for index, members in enumerate(groups):
    first = members[0]
    varying = [f for f in FIELDS if len({getattr(c, f) for c in members}) > 1]
    structure = ' '.join(f'{name}={value}' for name, value in group_structure(first, between).items())
    lines.append(f'group {index + 1} [{group_key(first)}]: {len(members)} run(s), one program; '
                 f'{structure}; lanes vary: {", ".join(varying) or "-"}')
    for config in members:
      values = ' '.join(f'{f}={getattr(config, f)}' for f in vmapped_fields(config))
      lines.append(f'  {run_id(config)}  {values}')
  return '\n'.join(lines)


def group_structure(config: TrainConfig, shown: Iterable[str] = ()) -> dict[str, Any]:
  """The settings that make `config`'s group, read from the option table: its model's STRUCTURE options, those
  off their defaults (what its `group_key` hashes), and the `shown` ones (e.g. those that tell groups apart)."""
  own = set(identity(config)) - set(vmapped_fields(config))
  return {name: getattr(config, name) for name, option in OPTIONS.items()
          if name in own or (option.role == STRUCTURE and uses(config, name)
                             and (option.group == 'model' or name in shown))}


# ----------------------------------------------------------------------------
# Training a group of K runs as one program.


# The loop settings of a sweep group: one jitted scan per epoch (no progress bar to refresh).
GROUP_SETTINGS = loop.Settings(progress=False, progress_updates=1)


def train_group(configs: Sequence[TrainConfig], dataset, settings: loop.Settings = GROUP_SETTINGS, *,
                cache: dict | None = None, folders: Sequence[Any] | None = None, checkpoint_dir: Path | None = None,
                before_write: Callable[[], None] | None = None) -> tuple[list[dict[str, Any]], Any]:
  """Trains K runs that differ only in values as one vmapped program (`bnjax.lab.loop`).

  Args:
    configs: K validated configs with one `group_key`.
    dataset: a `bnjax.lab.data.Dataset` with device arrays, shared by the lanes.
    settings: how the loop runs (its log, the fault injection `interrupt_after_epoch`).
    cache: compiled programs by group key, reused across calls when given.
    folders: per lane a `bnjax.lab.rundir.RunFolder` for metrics.jsonl and
      TensorBoard (None: none).
    checkpoint_dir: where the group checkpoints after every epoch and resumes
      from (None: no checkpoints).
    before_write: called before every write to `folders` and every
      checkpoint (a sweep worker checks there that it still owns the group).

  Returns:
    `(records, state)`: per run the summary (`loop.summarize`, with its
    `history`), and the final stacked `TrainState` (leading axis K).
  """
  from bnjax.lab import programs, rundir

  program = programs.lanes(configs, dataset, cache=cache)
  folders = folders or []
  checkpoints = rundir.Checkpoints(checkpoint_dir) if checkpoint_dir is not None else None
  resumed = checkpoints.resume(program, settings.log, 'group ') if checkpoints is not None else None
  start_epoch, histories = resumed or (0, None)
  for folder, history in zip(folders, histories or [[] for _ in configs]):
    _guarded(folder.start_metrics, before_write)(history)
  outputs = loop.Outputs(sinks=[_guarded(f.add_epoch, before_write) for f in folders],
                         checkpoint=_guarded(checkpoints.save, before_write) if checkpoints is not None else None,
                         checkpoint_every=1)
  try:
    result = loop.train(program, settings, outputs, start_epoch=start_epoch, histories=histories)
  finally:
    for folder in folders:
      folder.close()
    if checkpoints is not None:
      checkpoints.close()
  records = loop.summarize(program, result)
  for record, history in zip(records, result.histories):
    record['history'] = history
  return records, result.state


def _guarded(write: Callable, before_write: Callable[[], None] | None) -> Callable:
  """`write`, calling `before_write()` first (when given)."""
  if before_write is None:
    return write

  def checked_write(*args):
    before_write()
    return write(*args)

  return checked_write


# ----------------------------------------------------------------------------
# The sweep: groups -> one atomic JSON per run -> results.csv -> report.


def finished_runs(sweep_dir: str | Path) -> dict[str, dict]:
  """`{run_id: record}` of the runs already written in `sweep_dir/runs/`."""
  return _read_records(sorted(Path(sweep_dir, 'runs').glob('*.json')))


def _read_records(paths: Iterable[Path]) -> dict[str, dict]:
  """`{run_id: record}` of the run files that exist and parse (not ours, or unreadable: the run is redone)."""
  records = {}
  for path in paths:
    try:
      records[path.stem] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
      continue
  return records


def result_row(record: dict) -> dict[str, Any]:
  """One row of results.csv: ids, metrics, every hyperparameter, the validation curve."""
  row = {column: record.get(column) for column in ('run_id', 'group_id') + METRIC_COLUMNS}
  row.update(record['config'])
  row[CURVE_COLUMN] = json.dumps([round(m['val_accuracy'], 6) for m in record.get('history', [])])
  return row


def write_results(sweep_dir: str | Path, order: Sequence[str] | None = None) -> Path:
  """Regenerates `results.csv` from `runs/*.json` (atomically): the runs `order` names (the current command's),
  in its order; every run recorded there when `order` is None.

  Runs of an earlier command with other settings stay in `runs/` but are not in results.csv (nor the report).
  """
  records = finished_runs(sweep_dir)
  ids = [i for i in order if i in records] if order is not None else sorted(records)
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, extrasaction='ignore')
  writer.writeheader()
  for i in ids:
    writer.writerow({k: '' if v is None else v for k, v in result_row(records[i]).items()})
  path = Path(sweep_dir, 'results.csv')
  storage.write_text_atomic(path, buffer.getvalue())
  return path


def group_folder_name(members: Sequence[TrainConfig]) -> str:
  """The checkpoint folder of a group: its key and its members (a regrouped resume starts afresh)."""
  import hashlib

  members_digest = hashlib.sha256(' '.join(run_id(c) for c in members).encode()).hexdigest()[:8]
  return f'{group_key(members[0])}-{members_digest}'



def _error_records(configs: Sequence[TrainConfig], error: BaseException) -> list[dict]:
  text = f'{type(error).__name__}: {error}'.strip()
  tail = traceback.format_exception(error)[-3:]
  return [{'status': STATUS_ERROR, 'error': text, 'traceback': ''.join(tail), 'history': []} for _ in configs]


@dataclasses.dataclass(frozen=True)
class Sweep:
  """One sweep command as every phase of `run_sweep` reads it: made once, at its top.

  Attributes:
    folder: the sweep's folder.
    run_ids: the command's runs, in order (results.csv and the report list these).
    command: the command line (in each run's config.json and the report).
    training: the loop settings of its groups (`GROUP_SETTINGS` with the log;
      `interrupt_after_epoch` applies to the first group only).
    writer: this process reads and writes the files and claims (process 0);
      under `jax.distributed` the others train the same groups with it.
    num_workers, worker_index: this process is one of several workers sharing `folder`.
    claim_timeout: seconds without a heartbeat after which a group's claim is taken over.
    datasets: the data sets loaded so far, by `config.dataset_key`.
    compiled: the compiled group programs so far (`programs.lanes`'s cache).
  """

  folder: Path
  run_ids: tuple[str, ...]
  command: str
  training: loop.Settings
  writer: bool = True
  num_workers: int = 1
  worker_index: int = 0
  claim_timeout: float = CLAIM_TIMEOUT
  datasets: dict = dataclasses.field(default_factory=dict)
  compiled: dict = dataclasses.field(default_factory=dict)

  @property
  def log(self) -> Callable[[str], None]:
    return self.training.log

  @property
  def owner(self) -> str:
    """This worker's name in its claims."""
    return f'{socket.gethostname()}:{os.getpid()}:worker{self.worker_index}'


def run_sweep(
    configs: Sequence[TrainConfig],
    sweep_dir: str | Path,
    *,
    command: str = '',
    max_group_size: int | None = None,
    interrupt_after_groups: int | None = None,
    interrupt_after_epoch: int | None = None,
    report: bool = True,
    num_workers: int = 1,
    worker_index: int = 0,
    claim_timeout: float = CLAIM_TIMEOUT,
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
    interrupt_after_epoch: fault injection: the first group raises
      `loop.Interrupted` after that epoch's checkpoint (a kill mid-group).
    report: write `report.md` and its plots at the end.
    num_workers, worker_index: this process is one of several independent
      workers sharing `sweep_dir` (e.g. a SLURM job array): each group is
      claimed before it trains (`_claim`), so no group trains twice, and
      workers start at different groups. Every worker rebuilds results.csv
      when it is done: the last one to finish writes the complete one.
    claim_timeout: seconds without a heartbeat after which a claim is taken over.
  """
  if max_group_size is not None and max_group_size < 1:
    raise ValueError(f'--max_group_size={max_group_size} is invalid: expected a positive integer (or unset for '
                     'no cap).')
  # Under jax.distributed every process trains every group together (its lanes span every process's devices);
  # process 0 alone reads and writes the sweep's files and claims, and tells the others what to train.
  writer = parallel.is_main_process()
  sweep = Sweep(
      folder=Path(sweep_dir), run_ids=tuple(run_id(c) for c in configs), command=command,
      training=dataclasses.replace(GROUP_SETTINGS, log=log if writer else (lambda message: None),
                                   interrupt_after_epoch=interrupt_after_epoch),
      writer=writer, num_workers=num_workers, worker_index=worker_index, claim_timeout=claim_timeout,
  )
  groups = _groups_to_train(sweep, configs, max_group_size)
  # Each worker starts at its own share of the groups, then helps with the rest.
  start = len(groups) * worker_index // max(num_workers, 1)
  for index in [*range(start, len(groups)), *range(start)]:
    trained = _train_if_claimed(sweep, index, groups)
    if trained and index + 1 == interrupt_after_groups and index + 1 < len(groups):
      raise Interrupted(f'interrupted after group {index + 1} (fault injection)')
  return _finish(sweep, report)


def _groups_to_train(sweep: Sweep, configs: Sequence[TrainConfig], max_group_size: int | None) -> list[list]:
  """Writes sweep.json; returns the groups of the runs not finished yet (and logs how many)."""
  import jax

  if sweep.writer:
    (sweep.folder / 'runs').mkdir(parents=True, exist_ok=True)
    storage.write_json_atomic(sweep.folder / 'sweep.json', {'command': sweep.command, 'run_ids': list(sweep.run_ids)})
  done = finished_runs(sweep.folder) if sweep.writer else {}
  # Runs that raised are tried again (the cause may be fixed); completed and diverged ones are kept.
  to_train = parallel.from_main_process([done.get(i, {}).get('status', STATUS_ERROR) == STATUS_ERROR
                                         for i in sweep.run_ids])
  todo = [c for c, train in zip(configs, to_train) if train]
  groups = one_run_per_conv_group(group_runs(todo, max_group_size), jax.default_backend(), jax.device_count())
  sweep.log(f'{len(configs)} runs: {len(configs) - len(todo)} already finished, {len(todo)} to train in '
            f'{len(groups)} group(s)'
            + (f' (worker {sweep.worker_index + 1} of {sweep.num_workers})' if sweep.num_workers > 1 else '')
            + (f' on the {jax.device_count()} devices of {jax.process_count()} processes'
               if jax.process_count() > 1 else ''))
  others = len(set(done) - set(sweep.run_ids))
  if others:
    sweep.log(f'{others} other run(s) recorded in {sweep.folder / "runs"} (another command\'s settings) are left out '
              'of results.csv and the report')
  return groups


def _claim(sweep: Sweep, index: int, members: Sequence[TrainConfig]) -> storage.Claim | None:
  """This worker's claim on an unfinished group (process 0 claims), or None: finished, or another worker's.

  Claims are atomic (`claims/<group>/`, `bnjax.lab.storage.claim`). A claim whose worker stopped heartbeating
  for `claim_timeout` seconds (it died) is taken over, and the group resumes from its checkpoint; a worker that
  finds, before any write, that its claim was taken over (it was stopped past `claim_timeout`) stops that group
  and goes on (`ClaimLost`). A group claimed is looked at again: finished meanwhile, it is left.
  """
  if not (sweep.writer and _unfinished(sweep.folder, members)):  # (else another worker trained it meanwhile)
    return None
  claim = storage.claim(sweep.folder / 'claims' / group_folder_name(members), owner=sweep.owner,
                        stale_after=sweep.claim_timeout)
  if claim is None:
    sweep.log(f'group {index + 1}: claimed by another worker; skipped')
  elif not _unfinished(sweep.folder, members):  # finished between our look and our claim: not trained twice
    claim.release()
    claim = None
    sweep.log(f'group {index + 1}: finished by another worker meanwhile; skipped')
  return claim


def _train_if_claimed(sweep: Sweep, index: int, groups: Sequence[Sequence[TrainConfig]]) -> bool:
  """Trains and records group `index` under this worker's claim; returns whether it did (every process alike)."""
  claim = _claim(sweep, index, groups[index])
  if not parallel.from_main_process(claim is not None):
    return False
  try:
    with claim or contextlib.nullcontext():
      _train_and_record(sweep, index, groups, owns=claim.still_owned if claim is not None else None)
  except ClaimLost as error:
    sweep.log(f'group {index + 1}: {error}')
    return False
  return True


def _finish(sweep: Sweep, report: bool) -> list[dict]:
  """results.csv and the report (process 0); every process returns the command's records."""
  import jax

  if sweep.writer:
    write_results(sweep.folder, sweep.run_ids)
    if report:
      from bnjax.lab import report as report_lib

      report_lib.write_report(sweep.folder / 'results.csv', command=sweep.command, log=sweep.log)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices('bnjax sweep written')  # the others read the records process 0 wrote
  done = finished_runs(sweep.folder)
  return [done[i] for i in sweep.run_ids if i in done]


def finished_runs_of(sweep_dir: Path, members: Sequence[TrainConfig]) -> dict[str, dict]:
  """`{run_id: record}` of the given runs that are written in `sweep_dir/runs/`."""
  return _read_records(Path(sweep_dir, 'runs', f'{run_id(config)}.json') for config in members)


def _unfinished(sweep_dir: Path, members: Sequence[TrainConfig]) -> bool:
  """Whether some run of the group has no record, or one of an error (it is tried again)."""
  records = finished_runs_of(sweep_dir, members)
  return any(records.get(run_id(c), {}).get('status', STATUS_ERROR) == STATUS_ERROR for c in members)


def _train_and_record(sweep: Sweep, index: int, groups: Sequence[Sequence[TrainConfig]], *,
                      owns: Callable[[], bool] | None = None) -> None:
  """Trains one group (a claimed one) and writes (process 0) its records and results.csv.

  `owns()` says whether this worker still holds the group's claim; it is asked before every write (config,
  metrics, checkpoint, record), and `ClaimLost` stops the group as soon as the answer is no: the worker that
  took the claim over writes alone from then on.
  """
  def before_write():
    if owns is not None and not owns():
      raise ClaimLost('another worker took over its claim (this worker was stopped or stalled past '
                      '--claim_timeout); stopped it without writing, the new owner finishes it')

  members = groups[index]
  timer = time.perf_counter()
  records = _train_or_error(sweep, index, members, before_write)
  seconds = time.perf_counter() - timer
  if not sweep.writer:
    return
  _write_records(sweep, members, records, seconds, before_write)
  summary = ', '.join(f'{r["status"]}' if r.get('test_accuracy_moving_stats') is None
                      else f'{r["test_accuracy_moving_stats"]:.4f}' for r in records)
  sweep.log(f'group {index + 1}/{len(groups)}: {len(members)} run(s) in {seconds:.1f}s; test acc (moving stats): '
            f'{summary}')


def _train_or_error(sweep: Sweep, index: int, members: Sequence[TrainConfig], before_write) -> list[dict]:
  """The group's records: trained (`train_group`, in its run folders and checkpoints), or its error's."""
  import jax

  from bnjax.lab import build, rundir

  training = sweep.training if index == 0 else dataclasses.replace(sweep.training, interrupt_after_epoch=None)
  try:
    key = dataset_key(members[0])
    if key not in sweep.datasets:
      sweep.datasets[key] = build.dataset(members[0], put=jax.device_put)
    folders = [rundir.RunFolder(sweep.folder / 'runs' / run_id(c), c) for c in members] if sweep.writer else None
    for folder in folders or []:
      before_write()
      folder.write_config({'command': sweep.command})
    group_dir = sweep.folder / 'groups' / group_folder_name(members)
    records, _ = train_group(members, sweep.datasets[key], training, cache=sweep.compiled, folders=folders,
                             checkpoint_dir=group_dir / 'checkpoints', before_write=before_write)
  except (loop.Interrupted, ClaimLost):
    raise
  except Exception as error:  # noqa: BLE001  (a failing group is recorded; the sweep goes on)
    records = _error_records(members, error)
    sweep.log(f'group {index + 1} failed: {records[0]["error"]}')
  return records


def _write_records(sweep: Sweep, members: Sequence[TrainConfig], records: list[dict], seconds: float,
                   before_write) -> None:
  """One atomic JSON per run and results.csv; the group's checkpoints go unless a run of it raised."""
  from bnjax.lab import rundir

  for config, record in zip(members, records):
    record.update(run_id=run_id(config), group_id=group_key(config), config=config.to_dict(),
                  seconds=seconds / len(members), group_seconds=seconds, group_size=len(members))
    before_write()
    storage.write_json_atomic(sweep.folder / 'runs' / f'{record["run_id"]}.json', record)
  if all(r['status'] != STATUS_ERROR for r in records):
    before_write()
    rundir.remove_tree(sweep.folder / 'groups' / group_folder_name(members))
  # (A group that failed keeps its checkpoints, e.g. those before a full disk: its re-run resumes from them.)
  write_results(sweep.folder, sweep.run_ids)
