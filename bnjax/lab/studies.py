"""Named experiments, one kind of thing: every preset, sweep and reproduction is a `Study`.

    run_study('mnist_plain_vs_bn', 'runs/studies')                    # the main job (old name: seed000)
    run_study('momentum', 'runs/studies', overrides={'epochs': 20})   # a sweep of BN momentum
    run_study('repro_renorm', 'runs/studies', budget='full')          # a reproduction of docs/results.md

A study declares its settings per budget (`cpu`: minutes on a 2-core
machine; `full`: the source's or paper's budget) and a `run(out, settings,
data_dir, log) -> {'table': markdown, 'results': ...}` that trains with the
lab's machinery (`experiment.run`, `sweep.run_sweep`, one loop underneath)
and writes its plots. One override syntax for all: `--NAME=VALUE` or
`--NAME=V1,V2` on the command line (`overrides={'NAME': value or [values]}`
here), where NAME is one of the study's settings; a grid study's settings are
every training option (one value sets it, several make an axis).

Outputs in `<out>/<study>/`: `results.json` (numbers, settings, hardware,
wall time), `table.md`, PNGs, and the runs (resumable: re-running reuses
finished runs).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from bnjax.lab import config as config_lib
from bnjax.lab import corruption_table, population, repro, shift_study
from bnjax.lab.options import OPTIONS

BUDGETS = ('cpu', 'full')


@dataclasses.dataclass(frozen=True)
class Study:
  """A named experiment.

  Attributes:
    name: its name (`./launch.sh NAME`).
    description: one line.
    run: `(out: Path, settings: dict, data_dir, log) -> {'table': str, 'results': ...}`.
    budgets: `{'cpu': settings, 'full': settings}`.
    aliases: older names.
    grid: settings are training options (values or lists of values: axes).
    sweep: a sweep of those settings (`run_grid`), with `finalize` applied to each run's config.
  """

  name: str
  description: str
  run: Callable[..., dict]
  budgets: Mapping[str, Mapping[str, Any]]
  aliases: tuple[str, ...] = ()
  grid: bool = False
  sweep: bool = False
  finalize: Callable | None = None


# ----------------------------------------------------------------------------
# Grid studies: a base and axes over the training options, trained as a sweep with its report.


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
  return {'table': report_lib.summary_table(rows), 'results': [{k: r.get(k) for k in
                                                                  ('run_id', 'config', 'status',
                                                                   'test_accuracy_moving_stats',
                                                                   'test_accuracy_batch_stats')} for r in records]}


def _grid_study(name, description, cpu: dict, full: dict, finalize=None, aliases=()) -> Study:
  run = lambda out, settings, data_dir, log: run_grid(out, settings, data_dir, log, finalize=finalize)
  return Study(name, description, run, {'cpu': cpu, 'full': full}, aliases, grid=True, sweep=True, finalize=finalize)


# ----------------------------------------------------------------------------
# Comparisons of single runs (the source's two studies as presets).


def variant_configs(out: Path, settings: Mapping, data_dir: str | None, variants: Mapping[str, dict]) -> dict:
  """`{variant: config}`: each variant's fields over the study's settings over its model's own training
  settings (ResNet-20's data set and recipe), trained in `out/<variant>`."""
  base = dict(settings) if data_dir is None else {**settings, 'data_dir': data_dir}
  return {variant: config_lib.make(config_lib.with_model_defaults(
      {**base, **fields, 'workdir': str(out / variant)}, keep=LENGTH)) for variant, fields in variants.items()}


def run_variants(out: Path, settings: Mapping, data_dir: str | None, log, *, variants: Mapping[str, dict]) -> dict:
  """Each variant as one `experiment.run` in `out/<variant>` (resumed if there), and their curves together."""
  from bnjax.lab import experiment, plots
  from bnjax.lab.report import markdown_table

  summaries, histories, rows = {}, {}, []
  for variant, config in variant_configs(out, settings, data_dir, variants).items():
    if len(variants) > 1:
      log(f'--- {variant}: norm={config.norm}')
    summary = experiment.run(config, resume='auto', progress=settings.get('progress_updates', 10) > 0, log=log,
                             folder_flag=None)
    summaries[variant] = summary
    histories[variant] = [json.loads(line) for line in (out / variant / 'metrics.jsonl').read_text().splitlines()]
    figure = lambda key: '-' if summary.get(key) is None else f'{summary[key]:.4f}'
    rows.append([variant, summary['status'], figure('test_accuracy'), figure('best_val_accuracy'),
                 f'{summary.get("train_seconds", 0.0):.1f}', str(out / variant)])
  plots.plot_curves(histories, out / 'curves.png', title=f'{out.name}: {", ".join(variants)}')
  table = markdown_table(['run', 'status', 'test acc', 'best val', 'train s', 'workdir'], rows)
  return {'table': table, 'results': summaries}


def _variants_study(name, description, settings: dict, variants: dict, aliases=(), full: dict | None = None) -> Study:
  run = lambda out, s, data_dir, log: run_variants(out, s, data_dir, log, variants=variants)
  return Study(name, description, run, {'cpu': settings, 'full': full or settings}, aliases, grid=True)


# ----------------------------------------------------------------------------
# The registry.

MOMENTA = [0.6, 0.75, 0.85, 0.9, 0.99]
SHIFT_METHODS = ('source', 'prediction_bn', 'prior', 'adabn', 'tent')
_MNIST = dict(dataset='mnist', model='mnist_mlp', optimizer='adam', learning_rate=1e-3, validation='test')
# The single runs the two source studies compare (also `experiments/train.py --preset`).
# ResNet-20 with its own training settings (bnjax.lab.registry), the test set as validation.
_RESNET20 = dict(model='resnet20', validation='test')
PRESET_VARIANTS = {'mnist_plain_vs_bn': {'plain': dict(norm='none'), 'bn': dict(norm='bn')}, 'cifar_cnn': {'run': {}}}

STUDIES: dict[str, Study] = {study.name: study for study in (
    _variants_study('mnist_plain_vs_bn', 'The source: MNIST MLP, plain vs BN: Adam, 20 epochs, batch 500, test set '
                    'as validation.', dict(_MNIST, scaling='unit', epochs=20, batch_size=500),
                    PRESET_VARIANTS['mnist_plain_vs_bn'], aliases=('seed000',)),
    _variants_study('cifar_cnn', 'The source: CIFAR-10 CNN with BN: Adam 1e-4, batch 32, 30 epochs, 30% of train '
                    'held out (seed 777).', dict(repro.CIFAR), PRESET_VARIANTS['cifar_cnn'], aliases=('seed003',)),
    _variants_study('cifar_resnet20', "He et al. 2016's ResNet-20 on CIFAR-10 with their recipe (SGD momentum 0.9, "
                    'lr 0.1 divided by 10 at 50% and 75%, weight decay 1e-4, batch 128, crop + flip, per-channel '
                    'standardization); the paper: 8.75% test error after 64k iterations.',
                    dict(_RESNET20, steps=10_000), {'run': {}}, full=dict(_RESNET20, steps=64_000)),
    _grid_study('momentum', 'BN momentum on the MNIST MLP at batch 500: 0.6..0.99 and the inverse-decay schedule; '
                '2 epochs, 3 seeds (one program of 15 lanes + one of 3).',
                dict(_MNIST, norm='bn', batch_size=500, epochs=2, momentum=MOMENTA,
                     momentum_schedule=['constant', 'inverse_decay'], seed=[0, 1, 2]),
                dict(_MNIST, norm='bn', batch_size=500, epochs=20, momentum=MOMENTA,
                     momentum_schedule=['constant', 'inverse_decay'], seed=[0, 1, 2])),
    _grid_study('batch_size', 'Batch size 32..5000 with BN (momentum 0.99), MNIST MLP, 1 epoch, 2 seeds.',
                dict(_MNIST, norm='bn', epochs=1, batch_size=[32, 128, 500, 5000], seed=[0, 1]),
                dict(_MNIST, norm='bn', epochs=20, batch_size=[32, 128, 500, 5000], seed=[0, 1, 2])),
    _grid_study('momentum_batch_size', 'The rule of thumb: small batch -> high momentum, large batch -> low momentum '
                '(or inverse decay). Momentum 0.6..0.99 + inverse decay x batch 32..5000, MNIST MLP, 1 epoch, 2 seeds.',
                dict(_MNIST, norm='bn', epochs=1, momentum=MOMENTA, momentum_schedule=['constant', 'inverse_decay'],
                     batch_size=[32, 128, 500, 5000], seed=[0, 1]),
                dict(_MNIST, norm='bn', epochs=20, momentum=MOMENTA, momentum_schedule=['constant', 'inverse_decay'],
                     batch_size=[32, 128, 500, 5000], seed=[0, 1, 2])),
    _grid_study('dropout', 'Dropout placement (none, before_norm: the variance shift, after_norm, end) x rate 0.2/0.5 '
                'x norm none/bn, MNIST MLP, batch 500, 2 epochs, 2 seeds.',
                dict(_MNIST, batch_size=500, epochs=2, dropout_placement=['none', 'before_norm', 'after_norm', 'end'],
                     dropout_rate=[0.2, 0.5], norm=['none', 'bn'], seed=[0, 1]),
                dict(_MNIST, batch_size=500, epochs=20, dropout_placement=['none', 'before_norm', 'after_norm', 'end'],
                     dropout_rate=[0.2, 0.5], norm=['none', 'bn'], seed=[0, 1, 2])),
    _grid_study('renorm', 'Batch renorm vs BN vs none at small batches (2, 4, 8, 32), MNIST MLP, 600 steps each '
                "(renorm with the paper's clipping warm-up scaled to the run), 2 seeds.",
                dict(_MNIST, steps=600, batch_size=[2, 4, 8, 32], norm=['bn', 'renorm', 'none'], seed=[0, 1]),
                dict(_MNIST, steps=20000, batch_size=[2, 4, 8, 32], norm=['bn', 'renorm', 'none'], seed=[0, 1, 2]),
                finalize=repro.renorm_warmup_scaled),
    Study('repro_seed000', 'MNIST MLP, plain vs BN (20 epochs, batch 500, Adam, 3 seeds), and BN momentum 0.9 / 0.6.',
          repro.study_seed000,
          {'cpu': dict(epochs=20, seeds=[0, 1, 2], momenta=[0.99, 0.9, 0.6]),
           'full': dict(epochs=20, seeds=[0, 1, 2], momenta=[0.99, 0.9, 0.6])}),
    Study('repro_seed003', 'CIFAR-10 CNN with BN (Adam 1e-4, batch 32, 30% held out): validation accuracy per epoch.',
          repro.study_seed003,
          {'cpu': dict(epochs=10, seed=0), 'full': dict(epochs=30, seed=0)}),
    Study('repro_fig1', 'Ioffe & Szegedy 2015, Figure 1: 3 x 100 sigmoid MLP, batch 60, with and without BN.',
          repro.study_fig1,
          {'cpu': dict(steps=50_000, every=500, batch_size=60, learning_rate=0.1, seed=0),
           'full': dict(steps=50_000, every=250, batch_size=60, learning_rate=0.1, seed=0)}),
    Study('repro_momentum_batch', 'BN momentum (0.6..0.99, inverse decay) x batch size (32..5000), MNIST MLP.',
          repro.study_momentum_batch,
          {'cpu': dict(epochs=3, seeds=[0, 1], momenta=MOMENTA, batch_sizes=[32, 128, 500, 5000]),
           'full': dict(epochs=20, seeds=[0, 1, 2], momenta=MOMENTA, batch_sizes=[32, 128, 500, 5000])}),
    Study('repro_dropout', 'Dropout placement (none, before_norm, after_norm, end) x rate 0.2 / 0.5: accuracy and '
          'variance shift, MNIST MLP and CIFAR-10 CNN.',
          repro.study_dropout,
          {'cpu': dict(placements=list(repro.PLACEMENTS), rates=[0.2, 0.5], mlp_epochs=10, seeds=[0, 1, 2],
                       cnn_epochs=2, cnn_seeds=[0]),
           'full': dict(placements=list(repro.PLACEMENTS), rates=[0.2, 0.5], mlp_epochs=20, seeds=[0, 1, 2],
                        cnn_epochs=30, cnn_seeds=[0, 1, 2])}),
    Study('repro_renorm', 'Batch renorm vs BN vs no norm with BN over ghost batches of 2, 4, 8, 32 (MNIST MLP).',
          repro.study_renorm,
          {'cpu': dict(batch_size=128, ghost_sizes=[2, 4, 8, 32], epochs=5, seeds=[0, 1, 2]),
           'full': dict(batch_size=128, ghost_sizes=[2, 4, 8, 32], epochs=20, seeds=[0, 1, 2])}),
    Study('precise_vs_ema', 'EMA vs precise BN statistics (Wu & Johnson 2021) over BN momentum x batch size, MNIST '
          'MLP; the moving-statistics bug repaired after the fact by precise statistics.',
          population.study_precise_vs_ema,
          {'cpu': dict(epochs=3, seeds=[0, 1], momenta=MOMENTA, batch_sizes=[32, 128, 500, 5000],
                       precise_examples=10_000),
           'full': dict(epochs=20, seeds=[0, 1, 2], momenta=MOMENTA, batch_sizes=[32, 128, 500, 5000],
                        precise_examples=10_000)}),
    Study('precise_examples', 'How many examples precise BN needs: test accuracy vs examples (10^2..6x10^4), MNIST '
          'MLP at batch 500 and CIFAR-10 CNN, against the moving averages.',
          population.study_precise_examples,
          {'cpu': dict(mlp_epochs=5, cnn_epochs=2, seed=0, examples=[100, 300, 1000, 3000, 10_000, 30_000, 60_000]),
           'full': dict(mlp_epochs=20, cnn_epochs=30, seed=0,
                        examples=[100, 300, 1000, 3000, 10_000, 30_000, 60_000])}),
    Study('small_batch_norms', 'Normalization at 2/4/8/32 examples per batch: BN, renorm and frozen BN over ghost '
          'batches vs group norm, layer norm and none; MNIST MLP and CIFAR-10 CNN.',
          population.study_small_batch_norms,
          {'cpu': dict(batch_size=128, ghost_sizes=[2, 4, 8, 32], mlp_epochs=20, seeds=[0, 1, 2], cnn_epochs=2,
                       cnn_seeds=[0], freeze_epochs=2, cnn_freeze_epochs=1, model='cifar_cnn'),
           'full': dict(batch_size=128, ghost_sizes=[2, 4, 8, 32], mlp_epochs=20, seeds=[0, 1, 2], cnn_epochs=30,
                        cnn_seeds=[0, 1, 2], freeze_epochs=2, cnn_freeze_epochs=2, model='cifar_cnn')}),
    Study('bn_shift', 'BN under distribution shift: source models (MNIST MLP, CIFAR-10 CNN; BN momentum, batch size, '
          'renorm, ghost BN, group/layer norm) evaluated on MNIST-C / CIFAR-10-C with source statistics, '
          'prediction-time BN, the Schneider prior, AdaBN and TENT.',
          shift_study.study_bn_shift,
          {'cpu': dict(datasets=['mnist', 'cifar10'], mnist_models=['bn', 'bn_momentum_0.9', 'bn_batch_32', 'renorm',
                                                                    'ghost_50', 'group', 'layer'],
                       cifar10_models=['bn', 'group'], mnist_epochs=3, cifar10_epochs=2, seed=0,
                       mnist_corruptions=list(corruption_table.names(corruption_table.MNIST)),
                       cifar10_corruptions=list(corruption_table.names(corruption_table.CIFAR)), severities=[1, 3, 5], test_examples=2000,
                       methods=list(SHIFT_METHODS), test_batch_size=200, prior_n=16.0, tent_lr=1e-3,
                       tent_optimizer='adam', corruption_seed=0, models_dir=''),
           'full': dict(datasets=['mnist', 'cifar10'], mnist_models=list(shift_study.MODELS),
                        cifar10_models=['bn', 'bn_momentum_0.9', 'bn_batch_32', 'renorm', 'ghost_8', 'group',
                                        'layer'], mnist_epochs=20, cifar10_epochs=30, seed=0, mnist_corruptions=list(corruption_table.names(corruption_table.MNIST)),
                        cifar10_corruptions=list(corruption_table.names(corruption_table.CIFAR)), severities=[1, 2, 3, 4, 5], test_examples=10_000,
                        methods=list(SHIFT_METHODS), test_batch_size=200, prior_n=16.0, tent_lr=1e-3,
                        tent_optimizer='adam', corruption_seed=0, models_dir='')}),
    Study('repro_bug', 'The moving-statistics bug and center/scale off after the nonlinearity (MNIST MLP).',
          repro.study_bug,
          {'cpu': dict(epochs=20, seeds=[0, 1, 2]), 'full': dict(epochs=20, seeds=[0, 1, 2])}),
)}
# The sweeps among the studies (`experiments/sweep.py --preset`).
GRID_STUDIES = tuple(name for name, study in STUDIES.items() if study.sweep)
ALIASES = {alias: study.name for study in STUDIES.values() for alias in study.aliases}
ALIASES.update({name[len('repro_'):]: name for name in STUDIES if name.startswith('repro_')
                and name[len('repro_'):] not in STUDIES and name[len('repro_'):] not in ALIASES})


def get(name: str) -> Study:
  """The study of a name or an old name (seed000, seed003; repro's bare names such as 'fig1')."""
  study = STUDIES.get(ALIASES.get(name, name))
  if study is None:
    raise ValueError(f'--study={name!r} is invalid: expected one of {", ".join(STUDIES)} '
                     f'(old names: {", ".join(ALIASES)}).')
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
    if key not in settings and not (study.grid and key in OPTIONS):
      raise ValueError(f'study {study.name} has no setting --{key}; its settings are '
                       f'{sorted(settings) + (["every training option"] if study.grid else [])}.')
    settings[key] = _parse(study, settings, key, value) if isinstance(value, str) else value
  if study.grid and 'model' in (overrides or {}):
    settings = _with_model(settings, set(overrides))
  if study.grid:
    # --steps and --epochs are two ways to say how long: the one given replaces the study's other one.
    for given, other in (('steps', 'epochs'), ('epochs', 'steps')):
      if given in (overrides or {}) and other not in (overrides or {}) and settings.get(given) is not None:
        settings.pop(other, None)
  return settings


LENGTH = ('epochs', 'steps')


def _with_model(settings: dict, given: set) -> dict:
  """A grid study's settings with another `--model`: the model's own training settings replace the study's
  single values (its recipe: data set, optimizer, ...), except the study's axes (lists), its length
  (epochs/steps: the budget) and the settings given."""
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
