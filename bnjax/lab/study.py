"""What a study is, and the two shapes most study files take: a grid of training options, or a few single runs.

A study (one file in `bnjax/lab/studies/`, `STUDY = Study(...)`) declares its
settings per budget (`cpu`: minutes on a 2-core machine; `full`: the source's
or paper's budget) and a `run(out, settings, data_dir, log) -> {'table':
markdown, 'results': ...}` that trains with the lab's machinery
(`experiment.run`, `sweep.run_sweep`, one loop underneath) and writes its
plots (`bnjax.lab.plots`). `bnjax.lab.studies` finds the files, checks the
settings a command gives and runs a study into its folder.

    STUDY = grid_study('momentum', 'BN momentum ...', cpu=dict(..., momentum=[0.6, 0.9]), full=dict(...))
    STUDY = single_runs_study('mnist_plain_vs_bn', '...', dict(...), runs={'plain': dict(norm='none'), ...})
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

from bnjax.lab import config as config_lib

BUDGETS = ('cpu', 'full')
# The two ways to say how long a run trains: a study's budget gives one of them.
LENGTH = ('epochs', 'steps')


@dataclasses.dataclass(frozen=True)
class Study:
  """A named experiment.

  Attributes:
    name: its name (`./launch.sh NAME`), the name of its file in `bnjax/lab/studies/`.
    description: one line.
    run: `(out: Path, settings: dict, data_dir, log) -> {'table': str, 'results': ...}`.
    budgets: `{'cpu': settings, 'full': settings}`.
    training_options: its settings are training options (a value sets one, a list of values is an axis);
      every other training option is a setting too.
    sweep: its settings are a grid trained as one sweep (`run_grid`), with `finalize` applied to each run's config.
    runs: the single runs it compares, `{name: the fields that differ}` (`run_single_runs`).
  """

  name: str
  description: str
  run: Callable[..., dict]
  budgets: Mapping[str, Mapping[str, Any]]
  training_options: bool = False
  sweep: bool = False
  finalize: Callable | None = None
  runs: Mapping[str, Mapping[str, Any]] | None = None


# ----------------------------------------------------------------------------
# A grid of training options (lists are axes), trained as one sweep with its report.


def run_grid(out: Path, settings: Mapping, data_dir: str | None, log, *, finalize=None) -> dict:
  """Trains the grid of `settings` (lists are axes) as a sweep in `out`, with its report."""
  from bnjax.lab import report as report_lib
  from bnjax.lab import sweep

  base = {k: v for k, v in settings.items() if not isinstance(v, list)}
  if data_dir is not None:
    base['data_dir'] = data_dir
  grid = {k: v for k, v in settings.items() if isinstance(v, list)}
  configs, notes = sweep.expand_grid(config_lib.unchecked(base), grid, finalize)
  for note in notes:
    log(f'note: {note}')
  if not configs:
    raise ValueError('no valid run in the grid: ' + '; '.join(notes))
  records = sweep.run_sweep(configs, out, command=f'study {out.name}', report=True, log=log)
  rows = [sweep.result_row(r) for r in records]
  keys = ('run_id', 'config', 'status', 'test_accuracy_moving_stats', 'test_accuracy_batch_stats')
  return {'table': report_lib.summary_table(rows), 'results': [{k: r.get(k) for k in keys} for r in records]}


def grid_study(name: str, description: str, cpu: dict, full: dict, finalize: Callable | None = None) -> Study:
  """A study of a grid: `cpu` and `full` are training options, lists of values its axes."""
  run = lambda out, settings, data_dir, log: run_grid(out, settings, data_dir, log, finalize=finalize)
  return Study(name, description, run, {'cpu': cpu, 'full': full}, training_options=True, sweep=True,
               finalize=finalize)


# ----------------------------------------------------------------------------
# A few single runs, each in its own folder, compared in one table and one plot.


def single_run_configs(out: Path, settings: Mapping, data_dir: str | None, runs: Mapping[str, dict]) -> dict:
  """`{run: config}`: each run's fields over the study's settings over its model's own training settings
  (ResNet-20's data set and recipe), trained in `out/<run>`."""
  base = dict(settings) if data_dir is None else {**settings, 'data_dir': data_dir}
  return {name: config_lib.make(config_lib.with_model_defaults(
      {**base, **fields, 'workdir': str(out / name)}, keep=LENGTH)) for name, fields in runs.items()}


def run_single_runs(out: Path, settings: Mapping, data_dir: str | None, log, *, runs: Mapping[str, dict]) -> dict:
  """Each run as one `experiment.run` in `out/<run>` (resumed if there), and their curves together."""
  import json

  from bnjax.lab import experiment, plots
  from bnjax.lab.report import markdown_table

  summaries, histories, rows = {}, {}, []
  for name, config in single_run_configs(out, settings, data_dir, runs).items():
    if len(runs) > 1:
      log(f'--- {name}: norm={config.norm}')
    summary = experiment.run(config, resume='auto', progress=settings.get('progress_updates', 10) > 0, log=log,
                             folder_flag=None)
    summaries[name] = summary
    histories[name] = [json.loads(line) for line in (out / name / 'metrics.jsonl').read_text().splitlines()]
    figure = lambda key: '-' if summary.get(key) is None else f'{summary[key]:.4f}'
    rows.append([name, summary['status'], figure('test_accuracy'), figure('best_val_accuracy'),
                 f'{summary.get("train_seconds", 0.0):.1f}', str(out / name)])
  plots.plot_curves(histories, out / 'curves.png', title=f'{out.name}: {", ".join(runs)}')
  table = markdown_table(['run', 'status', 'test acc', 'best val', 'train s', 'workdir'], rows)
  return {'table': table, 'results': summaries}


def single_runs_study(name: str, description: str, cpu: dict, runs: dict, full: dict | None = None) -> Study:
  """A study of `runs` (`{name: fields}`) over the training options `cpu` (and `full`, default the same)."""
  run = lambda out, settings, data_dir, log: run_single_runs(out, settings, data_dir, log, runs=runs)
  return Study(name, description, run, {'cpu': cpu, 'full': full or cpu}, training_options=True, runs=runs)
