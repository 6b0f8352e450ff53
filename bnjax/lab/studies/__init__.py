"""The named experiments: one file per study in this folder, each with `STUDY = bnjax.lab.study.Study(...)`.

    run_study('mnist_plain_vs_bn', 'runs/studies')                    # the main job
    run_study('momentum', 'runs/studies', overrides={'epochs': 20})   # a sweep of BN momentum
    run_study('repro_renorm', 'runs/studies', budget='full')          # a reproduction of docs/results.md

The registry is the folder: every module here is a study of its file's name
(adding a file adds a study; `./launch.sh list` lists them). One override
syntax for all: `--NAME=VALUE` or `--NAME=V1,V2` on the command line
(`overrides={'NAME': value or [values]}` here), where NAME is one of the
study's settings; a study of training options takes every training option
(one value sets it, several make an axis).

Outputs in `<out>/<study>/`: `results.json` (numbers, settings, hardware,
wall time), `table.md`, PNGs, and the runs (resumable: re-running reuses
finished runs).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from bnjax.lab import config as config_lib
from bnjax.lab.options import OPTIONS
from bnjax.lab.study import BUDGETS, LENGTH, Study


def _studies_of_this_folder() -> dict[str, Study]:
  """`{name: study}` of every module of this package, in the order of their file names."""
  studies = {}
  for module_info in pkgutil.iter_modules(__path__):
    study = importlib.import_module(f'{__name__}.{module_info.name}').STUDY
    if study.name != module_info.name:
      raise ValueError(f'bnjax/lab/studies/{module_info.name}.py declares the study {study.name!r}: a study '
                       'is named after its file.')
    studies[study.name] = study
  return studies


STUDIES: dict[str, Study] = _studies_of_this_folder()
# The reproductions of docs/results.md: `--study=repro_all` runs them one after another.
REPRODUCTIONS = tuple(name for name in STUDIES if name.startswith('repro_'))
ALL_REPRODUCTIONS = 'repro_all'


def get(name: str) -> Study:
  """The study of a name."""
  study = STUDIES.get(name)
  if study is None:
    raise ValueError(f'--study={name!r} is invalid: expected one of {", ".join(STUDIES)} '
                     f'(or {ALL_REPRODUCTIONS}: every reproduction).')
  return study


def setting_names() -> tuple[str, ...]:
  """Every setting name of every study (the CLI defines a flag for each)."""
  names = dict.fromkeys(OPTIONS)
  for study in STUDIES.values():
    for settings in study.budgets.values():
      names.update(dict.fromkeys(settings))
  return tuple(names)


def _parse(study: Study, budget_settings: Mapping, name: str, text: str) -> Any:
  """A setting's flag text, typed after the study's value (a list: comma-separated items)."""
  if name in OPTIONS:
    values = config_lib.parse_values(name, text)
    single = not isinstance(budget_settings.get(name), list) and len(values) == 1
    return values[0] if single else values
  current = budget_settings[name]
  items = [item.strip() for item in str(text).split(',')]

  def typed(item, like):
    if isinstance(like, bool):
      return item.lower() in ('true', '1')
    for kind in (int, float):
      if isinstance(like, kind):
        try:
          return kind(item)
        except ValueError:
          raise ValueError(f'--{name}={text!r} is invalid: expected {kind.__name__} values.') from None
    return item

  if isinstance(current, list):
    return [typed(item, current[0] if current else 0.0) for item in items]
  if len(items) != 1:
    raise ValueError(f'--{name}={text!r} is invalid: study {study.name} takes one value.')
  return typed(items[0], current)


def settings_for(name: str, budget: str, overrides: Mapping[str, Any] | None = None) -> dict:
  """A study's settings at `budget`, with `overrides` (values, lists, or flag text to parse)."""
  study = get(name)
  if budget not in BUDGETS:
    raise ValueError(f'--budget={budget!r} is invalid: expected one of {", ".join(BUDGETS)}.')
  settings = dict(study.budgets[budget])
  for key, value in (overrides or {}).items():
    if key not in settings and not (study.training_options and key in OPTIONS):
      raise ValueError(f'study {study.name} has no setting --{key}; its settings are '
                       f'{sorted(settings) + (["every training option"] if study.training_options else [])}.')
    settings[key] = _parse(study, settings, key, value) if isinstance(value, str) else value
  if study.training_options and 'model' in (overrides or {}):
    settings = _with_model(settings, set(overrides))
  if study.training_options:
    # --steps and --epochs are two ways to say how long: the one given replaces the study's other one.
    for given, other in (('steps', 'epochs'), ('epochs', 'steps')):
      if given in (overrides or {}) and other not in (overrides or {}) and settings.get(given) is not None:
        settings.pop(other, None)
  return settings


def _with_model(settings: dict, given: set) -> dict:
  """A study's settings with another `--model`: the model's own training settings replace the study's single
  values (its recipe: data set, optimizer, ...), except the study's axes (lists), its length (epochs/steps:
  the budget) and the settings given."""
  fixed = {name: value for name, value in settings.items() if isinstance(value, list) or name in LENGTH
           or name in given}
  singles = {name: value for name, value in fixed.items() if not isinstance(value, list)}
  axes = {name: value[0] for name, value in fixed.items() if isinstance(value, list)}
  merged = config_lib.with_model_defaults({**axes, **singles}, keep=LENGTH)
  return {**settings, **{name: value for name, value in merged.items() if name not in fixed},
          **fixed}


def run_study(name: str, out_dir: str | Path, *, budget: str = 'cpu', overrides: Mapping[str, Any] | None = None,
              data_dir: str | None = None, command: str = '', log: Callable[[str], None] = print,
              resume: bool = False, overwrite: bool = False) -> dict:
  """Runs study `name` into `out_dir/<name>/`; returns (and writes) its results.json.

  Its runs already in the folder are reused when their settings are the study's now (finished ones as they
  are, stopped ones from their checkpoints); a run there with other settings is refused in one line.
  `overwrite`: delete the study's folder first (every run trains again); `resume`: the folder must hold
  the study's runs.
  """
  from bnjax.lab import rundir, storage
  from bnjax.lab.experiment import environment

  study = get(name)
  settings = settings_for(name, budget, overrides)
  out = Path(out_dir) / study.name
  if resume and overwrite:
    raise ValueError('--resume and --overwrite exclude each other: continue the study\'s runs, or replace them.')
  if resume and not (out.is_dir() and any(out.iterdir())):
    raise ValueError(f'--resume: {out} holds no run of study {study.name}; run without --resume to start it.')
  if overwrite:
    rundir.remove_tree(out)
  made = not out.exists()
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  try:
    produced = study.run(out, settings, data_dir, log)
  except BaseException:
    if made and not any(out.iterdir()):  # refused before anything was written: no empty folder left behind
      out.rmdir()
    raise
  seconds = time.perf_counter() - start
  results = {'study': study.name, 'description': study.description, 'budget': budget, 'settings': settings,
             'command': command, 'wall_seconds': seconds, 'environment': environment(),
             'results': produced['results'], 'table': produced['table']}
  storage.write_json_atomic(out / 'results.json', results)
  storage.write_text_atomic(out / 'table.md', f'{study.description}\n\n{produced["table"]}\n\n'
                            f'Command: `{command}`; budget {budget}: {json.dumps(settings)}; '
                            f'wall time {seconds / 60:.1f} min.\n')
  log(f'{study.name}: {out / "table.md"} ({seconds / 60:.1f} min)')
  return results
