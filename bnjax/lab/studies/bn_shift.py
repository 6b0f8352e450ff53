"""BN under distribution shift (MNIST-C, CIFAR-10-C) and test-time adaptation.

    ./launch.sh bn_shift                  # the cpu budget
    ./launch.sh bn_shift --budget=full

Source models are trained on the clean training split (or reused: each model's run folder
`<models_dir>/<dataset>/<model>`, by default `<out>/bn_shift/models/...`, is resumed, so a finished
run is not trained again; `--models_dir` points at another study's models), one
per norm setting of interest: BN at the default momentum 0.99 and batch, BN momentum 0.9,
BN at a small training batch, batch renorm, ghost BN, and group / layer norm (no batch dependence:
nothing to re-estimate, TENT adapts their scale and bias); on CIFAR-10 also He et al.'s ResNet-20 with its own
recipe (`resnet20`, `resnet20_steps` long: the full budget's, or `--cifar10_models=...,resnet20`), whose run is
the `cifar_resnet20` study's (`<out>/cifar_resnet20/run`, reused when that study has run; trained there
otherwise). Each is evaluated with every method of
`bnjax.lab.adaptation` (source, prediction_bn, prior, adabn, tent) on the clean test split and on
every corruption of `bnjax.lab.corruption_table` at each severity (generated once per data set and
shared by the models), with the test split cut into batches of `test_batch_size`.

Outputs: `results.json` (`errors[dataset][model][corruption][severity][method]`, clean errors, the
means), `table.md` (mean error at severity 5 and over all severities per model and method),
`errors.md` (every corruption x severity x method), and per model the plots
`<dataset>_<model>_severity.png` (mean error vs severity per method) and `<dataset>_<model>_bars.png`
(error per corruption at the highest severity, one bar per method).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

import numpy as np

from bnjax.lab import config as config_lib
from bnjax.lab import corruption_table as table
from bnjax.lab.options import ADAPT_METHODS as METHODS
from bnjax.lab.study import LENGTH, Study
from bnjax.lab.study_common import CIFAR, MNIST
from bnjax.lab.studies import cifar_resnet20

# The source's recipes; each model's norm and the budget's epochs come on top.
BASES = {'mnist': dict(MNIST, batch_size=500),
         'cifar10': {name: value for name, value in CIFAR.items() if name not in ('norm', 'epochs')}}
CORRUPTED = {'mnist': table.MNIST, 'cifar10': table.CIFAR}

# The source models: name -> the settings that differ from the data set's base.
MODELS = {
    'bn': dict(norm='bn'),
    'bn_momentum_0.9': dict(norm='bn', momentum=0.9),
    'bn_batch_32': dict(norm='bn', batch_size=32),
    'renorm': dict(norm='renorm'),
    'ghost_50': dict(norm='ghost', virtual_batch_size=50),
    'ghost_8': dict(norm='ghost', virtual_batch_size=8),
    'group': dict(norm='group', num_groups=8),
    'layer': dict(norm='layer'),
    'none': dict(norm='none'),
    # He et al.'s ResNet-20 with its own recipe (bnjax.lab.registry), as the cifar_resnet20 study trains it
    # (`resnet20_steps` long): by default its source model is that study's run, reused if there.
    'resnet20': cifar_resnet20.RESNET20,
}
# Source models that are another study's run (`<out>/<study>/<run>`), unless --models_dir names another folder.
STUDY_RUNS = {'resnet20': Path(cifar_resnet20.STUDY.name) / 'run'}
RESNET20_STEPS = {budget: settings['steps'] for budget, settings in cifar_resnet20.STUDY.budgets.items()}


def model_config(dataset: str, name: str, settings: Mapping, workdir: Path, data_dir):
  """The training config of source model `name` on `dataset` (clean)."""
  if name not in MODELS:
    raise ValueError(f'--{dataset}_models has {name!r}: expected names of {", ".join(MODELS)}.')
  if 'model' in MODELS[name]:  # a registry model: its own recipe and data set, `<name>_steps` long
    return _own_recipe_config(dataset, name, settings, workdir, data_dir)
  fields = {**BASES[dataset], **MODELS[name], 'epochs': settings[f'{dataset}_epochs'], 'seed': settings['seed'],
            'workdir': str(workdir), 'progress_updates': 0}
  if dataset == 'cifar10' and fields.get('batch_size') == 32 and name == 'bn_batch_32':
    fields['batch_size'] = 8  # the CNN already trains at 32: its small batch is 8
  if data_dir is not None:
    fields['data_dir'] = data_dir
  return config_lib.make(fields)


def _own_recipe_config(dataset: str, name: str, settings: Mapping, workdir: Path, data_dir):
  """The config of a source model that trains with its model's own settings (`config.with_model_defaults`)."""
  fields = {**MODELS[name], 'steps': settings[f'{name}_steps'], 'seed': settings['seed'], 'workdir': str(workdir),
            'progress_updates': 0}
  if data_dir is not None:
    fields['data_dir'] = data_dir
  fields = config_lib.with_model_defaults(fields, keep=LENGTH)
  if fields.get('dataset') != dataset:
    raise ValueError(f'--{dataset}_models has {name!r}, a model of {fields.get("dataset")}: list it in '
                     f'--{fields.get("dataset")}_models.')
  return config_lib.make(fields)


def adaptation_config(config, settings: Mapping):
  """`config` with the adaptation settings of the study (they do not change the training)."""
  return config_lib.make({'adapt': '+'.join(settings['methods']), 'test_batch_size': settings['test_batch_size'],
                          'adapt_prior_n': settings['prior_n'], 'tent_lr': settings['tent_lr'],
                          'tent_optimizer': settings['tent_optimizer']}, base=config)


def trained_state(config, dataset, log):
  """Trains the run in `config.workdir` (or resumes/reuses it) and returns its final `TrainState`."""
  from bnjax.lab import experiment, programs, rundir

  summary = experiment.run(config, dataset=dataset, resume='auto', progress=False, log=log)
  program = programs.single(config, dataset)
  checkpoints = rundir.Checkpoints(Path(config.workdir) / rundir.CHECKPOINTS)
  try:
    checkpoints.resume(program, lambda message: None)
  finally:
    checkpoints.close()
  return program.state, summary


def _mean(values) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def run(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  """Runs the study (see the module docstring); returns `{'table': markdown, 'results': ...}`."""
  from bnjax.lab.data import corruptions

  methods = list(settings['methods'])
  severities = [int(s) for s in settings['severities']]
  results: dict = {'errors': {}, 'clean': {}, 'means': {}, 'seconds': {}, 'exactness': corruptions.exactness()}
  for dataset in settings['datasets']:
    if dataset not in CORRUPTED:
      raise ValueError(f'--datasets has {dataset!r}: expected mnist or cifar10.')
    names = list(settings[f'{dataset}_corruptions'])
    for name in names:
      table.check(CORRUPTED[dataset], name, severities[0])
    start = time.perf_counter()
    models = source_models(dataset, settings, out, data_dir, log)
    results['seconds'][f'{dataset}_train'] = time.perf_counter() - start
    evaluate_under_shift(dataset, models, names, settings, data_dir, log, results)
    for name in models:
      results['means'].setdefault(dataset, {})[name] = mean_errors(results['errors'][dataset][name], names,
                                                                   methods, severities)
      plot_model(out, dataset, name, results, names, methods, severities)
  (out / 'errors.md').write_text(errors_markdown(results, methods, severities))
  return {'table': summary_markdown(results, methods, severities), 'results': results}


def source_models(dataset: str, settings: Mapping, out: Path, data_dir, log) -> dict:
  """`{model: (evaluation config, trained TrainState, evaluate, prepared clean data)}` for the study's source
  models on `dataset`, each trained in (or reused from) its run folder."""
  from bnjax.lab import adaptation, build

  models, clean = {}, None
  models_dir = Path(settings['models_dir']) if settings['models_dir'] else out / 'models'
  for name in settings[f'{dataset}_models']:
    workdir = out.parent / STUDY_RUNS[name] if name in STUDY_RUNS and not settings['models_dir'] else \
        models_dir / dataset / name
    config = model_config(dataset, name, settings, workdir, data_dir)
    if clean is None or config_lib.dataset_key(config) != clean[0]:
      clean = (config_lib.dataset_key(config), build.dataset(config))
    log(f'--- {dataset} {name}: training (or reusing) {config.workdir}')
    state, _ = trained_state(config, clean[1], log)
    evaluation = adaptation_config(config, settings)
    models[name] = (evaluation, state, adaptation.make_evaluator(evaluation, build.model(evaluation)), clean[1])
  return models


def evaluate_under_shift(dataset: str, models: Mapping, names, settings: Mapping, data_dir, log,
                         results: dict) -> None:
  """Every model with every method on the clean test images and on each corruption x severity (generated once,
  shared by the models); fills `results['clean'|'errors'|'seconds']` for `dataset`."""
  import jax.numpy as jnp

  from bnjax.lab import data as data_lib
  from bnjax.lab.data import corruptions

  methods = list(settings['methods'])
  raw = data_lib.read(dataset, source='auto', data_dir=data_dir)
  count = min(settings['test_examples'], len(raw.test_labels))
  test_uint8, labels = raw.test_images[:count], jnp.asarray(raw.test_labels[:count])

  def scaled(images, prepared):  # uint8 [N, H, W, C] -> the model's input scaling
    p = prepared.preprocessing
    return jnp.asarray(data_lib.scale_images(images, np.asarray(p.mean), np.asarray(p.std)))

  errors = {name: {} for name in models}
  start = time.perf_counter()
  for name, (_, state, evaluate, prepared) in models.items():
    results['clean'].setdefault(dataset, {})[name] = evaluate(state, scaled(test_uint8, prepared), labels, methods)
  generate_seconds = 0.0
  for corruption in names:
    for severity in (int(s) for s in settings['severities']):
      tick = time.perf_counter()
      corrupted = corruptions.corrupt(test_uint8, CORRUPTED[dataset], corruption, severity,
                                      seed=settings['corruption_seed'])
      generate_seconds += time.perf_counter() - tick
      for name, (_, state, evaluate, prepared) in models.items():
        errors[name].setdefault(corruption, {})[str(severity)] = evaluate(
            state, scaled(corrupted, prepared), labels, methods)
      log(f'{dataset} {corruption} severity {severity}: ' + '; '.join(
          f'{name} ' + ' '.join(f'{m}={errors[name][corruption][str(severity)][m]:.3f}' for m in methods)
          for name in models))
  results['seconds'][f'{dataset}_generate'] = generate_seconds
  results['seconds'][f'{dataset}_evaluate'] = time.perf_counter() - start - generate_seconds
  results['errors'][dataset] = errors


def mean_errors(per: Mapping, names, methods, severities) -> dict:
  """Per method: the mean error over corruptions at the highest severity, over all, and per severity."""
  return {m: {'severity_' + str(severities[-1]): _mean(per[c][str(severities[-1])][m] for c in names),
              'all': _mean(per[c][str(s)][m] for c in names for s in severities),
              'by_severity': [_mean(per[c][str(s)][m] for c in names) for s in severities]} for m in methods}


def plot_model(out: Path, dataset: str, name: str, results: Mapping, names, methods, severities) -> None:
  """`<dataset>_<name>_severity.png` (mean error vs severity) and `<dataset>_<name>_bars.png` (per corruption)."""
  from bnjax.lab import plots

  means, per, title = results['means'][dataset][name], results['errors'][dataset][name], f'{dataset} {name}'
  plots.plot_error_vs_severity({m: means[m]['by_severity'] for m in methods}, severities,
                               out / f'{dataset}_{name}_severity.png', title=f'{title}: mean error over corruptions',
                               clean={m: results['clean'][dataset][name][m] for m in methods})
  plots.plot_corruption_bars({c: {m: per[c][str(severities[-1])][m] for m in methods} for c in names},
                             out / f'{dataset}_{name}_bars.png', title=f'{title}: error at severity {severities[-1]}')


def _pct(value) -> str:
  return '-' if value is None else f'{100 * value:.1f}'


def summary_markdown(results: Mapping, methods, severities) -> str:
  """Per data set and model, per method: clean error, mean error at the highest severity, over all (%)."""
  from bnjax.lab.report import markdown_table

  last = severities[-1]
  header = ['data', 'model', 'statistic'] + list(methods)
  rows = []
  for dataset, by_model in results['means'].items():
    for name, means in by_model.items():
      rows.append([dataset, name, 'clean'] + [_pct(results['clean'][dataset][name][m]) for m in methods])
      rows.append([dataset, name, f'mean, severity {last}'] + [_pct(means[m][f'severity_{last}']) for m in methods])
      rows.append([dataset, name, 'mean, all severities'] + [_pct(means[m]['all']) for m in methods])
  return 'Test error (%) per method.\n\n' + markdown_table(header, rows)


def errors_markdown(results: Mapping, methods, severities) -> str:
  """Every corruption x severity x method (error %), one table per data set and model."""
  from bnjax.lab.report import markdown_table

  parts = []
  for dataset, by_model in results['errors'].items():
    for name, per in by_model.items():
      rows = [[c, str(s)] + [_pct(per[c][str(s)][m]) for m in methods] for c in per for s in severities]
      parts.append(f'## {dataset} {name}\n\n' + markdown_table(['corruption', 'severity'] + list(methods), rows))
  return '\n\n'.join(parts) + '\n'


_MNIST_CORRUPTIONS = list(table.names(table.MNIST))
_CIFAR_CORRUPTIONS = list(table.names(table.CIFAR))
_EVALUATION = dict(methods=list(METHODS), test_batch_size=200, prior_n=16.0, tent_lr=1e-3, tent_optimizer='adam',
                   corruption_seed=0, models_dir='')

STUDY = Study(
    'bn_shift', 'BN under distribution shift: source models (MNIST MLP, CIFAR-10 CNN; BN momentum, batch size, '
    'renorm, ghost BN, group/layer norm) evaluated on MNIST-C / CIFAR-10-C with source statistics, prediction-time '
    'BN, the Schneider prior, AdaBN and TENT.', run,
    {'cpu': dict(datasets=['mnist', 'cifar10'], mnist_models=['bn', 'bn_momentum_0.9', 'bn_batch_32', 'renorm',
                                                              'ghost_50', 'group', 'layer'],
                 cifar10_models=['bn', 'group'], mnist_epochs=3, cifar10_epochs=2, seed=0,
                 mnist_corruptions=_MNIST_CORRUPTIONS, cifar10_corruptions=_CIFAR_CORRUPTIONS, severities=[1, 3, 5],
                 test_examples=2000, resnet20_steps=RESNET20_STEPS['cpu'], **_EVALUATION),
     'full': dict(datasets=['mnist', 'cifar10'], mnist_models=list(MODELS),
                  cifar10_models=['bn', 'bn_momentum_0.9', 'bn_batch_32', 'renorm', 'ghost_8', 'group', 'layer',
                                  'resnet20'],
                  mnist_epochs=20, cifar10_epochs=30, seed=0, mnist_corruptions=_MNIST_CORRUPTIONS,
                  cifar10_corruptions=_CIFAR_CORRUPTIONS, severities=[1, 2, 3, 4, 5], test_examples=10_000,
                  resnet20_steps=RESNET20_STEPS['full'], **_EVALUATION)})
