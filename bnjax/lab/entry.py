"""What the scripts of experiments/ run, one function each: their `main` only parses flags and calls it.

    train(settings, resume=False)            # experiments/train.py: one run; prints its result; exit status
    sweep(grid, sweep_dir=None)              # experiments/sweep.py: a grid of runs as vmapped groups
    run_studies('momentum', 'runs/studies')  # experiments/study.py: a named study (bnjax.lab.studies)

Each returns the process's exit status: 0 done, 1 a run failed or diverged, 3 stopped by fault injection.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from bnjax.lab import config as config_lib


# ----------------------------------------------------------------------------
# One run (experiments/train.py).


def default_workdir(settings: Mapping[str, Any]) -> str:
  """`runs/<model>-<norm>-<time>` (an import path as a plain folder name)."""
  model = settings.get('model', config_lib.DEFAULTS.model).replace(':', '.')
  return str(Path('runs') / f'{model}-{settings.get("norm", "bn")}-{time.strftime("%Y%m%d-%H%M%S")}')


def train(settings: Mapping[str, Any], *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          interrupt_after_epoch: int | None = None, coordinator_timeout: float = 120.0) -> int:
  """Trains one run of the training options `settings` (the model's own training settings fill the rest) in
  `settings['workdir']` (default `default_workdir`) and prints its result line; returns the exit status.

  In a multi-process job every process calls this; process 0 prints and writes the files.
  """
  from bnjax.lab import rundir

  settings = dict(settings)
  if resume and 'workdir' not in settings:
    raise ValueError('--resume needs the --workdir of the run to continue.')
  workdir_given = 'workdir' in settings
  workdir = settings.pop('workdir', None) or default_workdir(settings)
  config = dataclasses.replace(config_lib.make(config_lib.with_model_defaults(settings)), workdir=str(workdir))
  try:
    return _train(config, workdir_given, resume=resume, overwrite=overwrite, progress=progress,
                  interrupt_after_epoch=interrupt_after_epoch, coordinator_timeout=coordinator_timeout)
  finally:
    rundir.unlock_all_folders()  # the workdir's lock (taken first in _train); a folder left empty goes too


def _train(config, workdir_given: bool, *, resume, overwrite, progress, interrupt_after_epoch,
           coordinator_timeout) -> int:
  import jax

  from bnjax.lab import build, experiment, loop, parallel

  # Before any other JAX call: afterwards jax.devices() lists every process's devices.
  parallel.initialize(config.coordinator_address, config.num_processes, config.process_id, coordinator_timeout)
  main_process = parallel.is_main_process()
  if jax.process_count() > 1 and not workdir_given:
    raise ValueError('a multi-process run needs --workdir: the same folder on every process (shared storage).')
  # The folder is locked (until this process ends) and checked, and the model built, before anything loads
  # (a user's builder that raises: one line now, not after the data loads).
  experiment.check_workdir(config, resume=resume, overwrite=overwrite)
  build.model(config)
  dataset = build.dataset(config, put=jax.device_put if jax.process_count() == 1 else None)
  print(f'{config.dataset}: {dataset.train_images.shape[0]} train, {dataset.val_images.shape[0]} validation, '
        f'{dataset.test_images.shape[0]} test examples from {dataset.source}; on {jax.devices()[0].device_kind}')
  try:
    summary = experiment.run(config, dataset=dataset, resume=resume, overwrite=overwrite,
                             interrupt_after_epoch=interrupt_after_epoch, progress=progress and main_process,
                             log=print if main_process else lambda message: None)
  except loop.Interrupted as error:
    print(error)
    return 3
  if main_process:
    figure = lambda key: '-' if summary.get(key) is None else f'{summary[key]:.4f}'
    print(f'\n{"run":10s} {"status":10s} {"test acc":>9s} {"best val":>9s} {"train s":>8s}   workdir')
    print(f'{"run":10s} {summary["status"]:10s} {figure("test_accuracy"):>9s} {figure("best_val_accuracy"):>9s} '
          f'{summary.get("train_seconds", 0.0):8.1f}   {config.workdir}')
  return 0 if summary['status'] == loop.STATUS_COMPLETED else 1


# ----------------------------------------------------------------------------
# A grid of runs (experiments/sweep.py).


def sweep(grid: Mapping[str, list], *, sweep_dir: str | None = None, dry_run: bool = False,
          max_group_size: int | None = None, interrupt_after_groups: int | None = None,
          interrupt_after_epoch: int | None = None, report: bool = True, num_workers: int | None = None,
          worker_index: int | None = None, claim_timeout: float | None = None, coordinator_timeout: float = 120.0,
          command: str = '') -> int:
  """Trains the grid `{option: [values]}` (one value sets it for every run, several are an axis; each run's
  model gives the defaults of the options not given) in `sweep_dir` (default runs/sweeps/grid); returns the
  exit status. `dry_run`: print the runs and their groups, train nothing."""
  from bnjax.lab import build, loop, parallel, storage
  from bnjax.lab import sweep as sweep_lib

  if max_group_size is not None and max_group_size < 1:
    raise ValueError(f'--max_group_size={max_group_size} is invalid: expected a positive integer (or unset '
                     'for no cap).')
  num_workers, worker_index = storage.resolve_workers(num_workers, worker_index)
  claim_timeout = sweep_lib.CLAIM_TIMEOUT if claim_timeout is None else claim_timeout
  if not (math.isfinite(claim_timeout) and claim_timeout > 0):
    raise ValueError(f'--claim_timeout={claim_timeout} is invalid: expected a finite number of seconds > 0 '
                     f'(default {sweep_lib.CLAIM_TIMEOUT:g}).')
  base = config_lib.unchecked({k: v[0] for k, v in grid.items() if len(v) == 1})
  axes = {k: v for k, v in grid.items() if len(v) > 1}
  configs, notes = sweep_lib.expand_grid(base, axes, None, given=set(grid))
  if not configs:
    raise ValueError('no valid run in the grid: ' + ' | '.join(notes))
  groups = sweep_lib.group_runs(configs, max_group_size)
  for group in groups:  # each group's model is built once now: a user's builder that raises fails before any work
    build.model(group[0])
  sweep_dir = Path(sweep_dir or Path('runs') / 'sweeps' / 'grid')
  print(f'{len(configs)} runs in {len(groups)} group(s) (one compiled program each) -> {sweep_dir}')
  for note in notes:
    print(f'  note: {note}')
  if dry_run:
    done = sweep_lib.finished_runs(sweep_dir)
    print(sweep_lib.describe_groups(groups))
    print(f'{sum(sweep_lib.run_id(c) in done for c in configs)} of them already finished in {sweep_dir}')
    return 0
  parallel.initialize(base.coordinator_address, base.num_processes, base.process_id, coordinator_timeout)
  try:
    records = sweep_lib.run_sweep(configs, sweep_dir, command=command, max_group_size=max_group_size,
                                  interrupt_after_groups=interrupt_after_groups,
                                  interrupt_after_epoch=interrupt_after_epoch, report=report,
                                  num_workers=num_workers, worker_index=worker_index, claim_timeout=claim_timeout)
  except (sweep_lib.Interrupted, loop.Interrupted) as error:
    print(error)
    return 3
  if len(records) < len(configs):
    print(f'{len(configs) - len(records)} run(s) still training in other workers; the last worker to finish writes '
          'the complete results.csv')
    return 0
  statuses = [r['status'] for r in records]
  print(f'{sweep_dir / "results.csv"}: ' + ', '.join(f'{statuses.count(s)} {s}' for s in sorted(set(statuses))))
  return 0 if all(s == loop.STATUS_COMPLETED for s in statuses) else 1


# ----------------------------------------------------------------------------
# Named studies (experiments/study.py).


def describe_studies() -> str:
  """Every study: its name, description and settings (`./launch.sh list`)."""
  from bnjax.lab import studies

  lines = []
  for study in studies.STUDIES.values():
    settings = 'every training option' if study.training_options else ', '.join(study.budgets['cpu'])
    lines.append(f'{study.name}: {study.description}\n    settings: {settings}')
  lines.append(f'{studies.ALL_REPRODUCTIONS}: every reproduction, one after another '
               f'({", ".join(studies.REPRODUCTIONS)}).')
  return '\n'.join(lines)


def run_studies(name: str, out: str, *, budget: str = 'cpu', overrides: Mapping[str, str] | None = None,
                data_dir: str | None = None, command: str = '', resume: bool = False, overwrite: bool = False,
                log: Callable[[str], None] = print) -> int:
  """Runs study `name` (`repro_all`: every reproduction) into `out/<study>/`, printing each table; every
  setting is checked before any work. Returns the exit status."""
  from bnjax.lab import studies

  names = list(studies.REPRODUCTIONS) if name == studies.ALL_REPRODUCTIONS else [name]
  if overrides and len(names) > 1:
    raise ValueError('settings apply to one study; name it with --study.')
  for each in names:
    studies.settings_for(each, budget, overrides)
  for each in names:
    results = studies.run_study(each, out, budget=budget, overrides=overrides, data_dir=data_dir, command=command,
                                log=log, resume=resume, overwrite=overwrite)
    print(results['table'])
  return 0
