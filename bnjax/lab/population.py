"""Studies beyond the moving average: precise BN statistics, frozen BN, group/layer norm baselines.

Each is a `bnjax.lab.studies.Study` (`./launch.sh precise_vs_ema`, ...); the
functions here train with the lab's machinery and write the table and plots.

1. `study_precise_vs_ema`: the momentum x batch size grid of the MNIST MLP
   with a precise-BN column per cell (Wu & Johnson 2021), and the classic bug
   (`--update_stats=false`) repaired after the fact by precise statistics.
2. `study_precise_examples`: test accuracy against the number of examples
   the precise statistics are computed from, against the moving averages.
3. `study_small_batch_norms`: BN, batch renorm and frozen BN over ghost
   batches of 2..32 examples, against group and layer norm and no norm.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from bnjax.lab import config as config_lib
from bnjax.lab import registry
from bnjax.lab import report as report_lib
from bnjax.lab.repro import (_MNIST, CIFAR, _plt, _save, _sweep, _with, cell, check_ghost_sizes, ghost_bn, ghost_renorm,
                             in_steps)
from bnjax.lab.report import markdown_table


# ----------------------------------------------------------------------------
# 1. EMA vs precise statistics over momentum x batch size; the bug repaired.


def study_precise_vs_ema(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  from bnjax.lab import sweep as sweep_lib

  base = config_lib.unchecked(dict(_MNIST, norm='bn', epochs=settings['epochs'], data_dir=data_dir,
                                   precise_bn=settings['precise_examples']))
  grid = dict(momentum=list(settings['momenta']), momentum_schedule=['constant', 'inverse_decay'],
              batch_size=list(settings['batch_sizes']), seed=list(settings['seeds']))
  configs, _ = sweep_lib.expand_grid(base, grid)
  bug, _ = sweep_lib.expand_grid(dataclasses.replace(base, batch_size=500),
                                 dict(update_stats=[True, False], seed=list(settings['seeds'])))
  records = _sweep(configs + [c for c in bug if c not in configs], out / 'sweep', log)
  grid_ids = {config_lib.run_id(c) for c in configs}
  rows = [sweep_lib.result_row(r) for r in records if r['run_id'] in grid_ids]
  for metric, name, title in (('test_accuracy_moving_stats', 'ema', 'moving averages (EMA)'),
                              ('test_accuracy_precise_stats', 'precise', 'precise statistics')):
    report_lib.plot_heatmap(rows, out / f'precise_vs_ema_{name}.png', metric,
                            f'test accuracy, {title} ({settings["epochs"]} epochs)')
  momenta = report_lib.sorted_labels({report_lib.momentum_label(r) for r in rows})
  moving = report_lib.aggregate(rows, ['batch_size', 'momentum'], 'test_accuracy_moving_stats')
  precise = report_lib.aggregate(rows, ['batch_size', 'momentum'], 'test_accuracy_precise_stats')
  table_rows = [[batch] + [f'{moving[(batch, m)][0]:.4f} / {precise[(batch, m)][0]:.4f}' for m in momenta]
                for batch in sorted({r['batch_size'] for r in rows})]
  bug_rows = []
  for update in (True, False):
    runs = _with(records, batch_size=500, update_stats=update, momentum=0.99, momentum_schedule='constant')
    bug_rows.append([f'--update_stats={str(update).lower()}'] +
                    [cell([r.get(k) for r in runs]) for k in ('test_accuracy_moving_stats', 'test_accuracy_batch_stats',
                                                              'test_accuracy_precise_stats')])
  table = (markdown_table(['batch size'] + [f'momentum {m}: EMA / precise' for m in momenta], table_rows) + '\n\n' +
           markdown_table(['MLP, batch 500, momentum 0.99', 'moving statistics', 'batch statistics',
                           'precise statistics'], bug_rows))
  keys = ('config', 'test_accuracy_moving_stats', 'test_accuracy_batch_stats', 'test_accuracy_precise_stats')
  return {'table': table, 'results': [{k: r.get(k) for k in keys} for r in records]}


# ----------------------------------------------------------------------------
# 2. How many examples precise BN needs.


def _train_state(config, dataset, log):
  from bnjax.lab import loop, programs

  program = programs.single(config, dataset)
  result = loop.train(program, progress=False, log=log)
  return program, loop.summarize(program, result)[0]


def precise_accuracy_curve(program, examples: Sequence[int]) -> dict[int, float]:
  """Test accuracy with precise statistics from the first N examples of a fixed permutation.

  The statistics come from whole training batches, so N is rounded up to a
  multiple of the batch size (at most the epoch's batches): the curve's keys
  are the examples actually used.
  """
  import jax

  config = program.configs[0]
  indices = program.epoch_batches(program.state, 0)  # [S, B]: a permutation of the training set
  curve = {}
  for n in examples:
    steps = min(indices.shape[0], -(-n // config.batch_size))
    if steps * config.batch_size not in curve:
      state = program.precise(program.state, indices[:steps])
      curve[steps * config.batch_size] = float(jax.device_get(program.evaluate(state, 'test', 'moving').accuracy()[0]))
  return curve


def study_precise_examples(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  import jax

  from bnjax.lab import build

  models = {'MNIST MLP, batch 500': config_lib.make(dict(_MNIST, norm='bn', batch_size=500, data_dir=data_dir,
                                                         epochs=settings['mlp_epochs'], seed=settings['seed']))}
  if settings['cnn_epochs']:
    models['CIFAR-10 CNN, batch 32'] = config_lib.make(dict(CIFAR, epochs=settings['cnn_epochs'], data_dir=data_dir,
                                                            seed=settings['seed']))
  curves, moving = {}, {}
  for label, config in models.items():
    program, summary = _train_state(config, build.dataset(config, put=jax.device_put), log)
    curves[label] = precise_accuracy_curve(program, settings['examples'])
    moving[label] = summary['test_accuracy_moving_stats']
  examples = sorted({n for curve in curves.values() for n in curve})
  rows = [[n] + [f'{curves[label][n]:.4f}' if n in curves[label] else '-' for label in models] for n in examples]
  rows.append(['moving averages (EMA)'] + [f'{moving[label]:.4f}' for label in models])
  table = markdown_table(['examples for precise BN (whole batches)'] + list(models), rows)
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for index, label in enumerate(models):
    ax.plot(list(curves[label]), list(curves[label].values()), 'o-', color=f'C{index}', label=f'{label}: precise')
    ax.axhline(moving[label], color=f'C{index}', linestyle='--', linewidth=1, label=f'{label}: EMA')
  ax.set_xscale('log')
  ax.set_xlabel('examples the precise statistics are computed from')
  ax.set_ylabel('test accuracy')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, out / 'precise_examples.png')
  return {'table': table, 'results': {'curves': {k: {str(n): a for n, a in v.items()} for k, v in curves.items()},
                                      'moving': moving}}


# ----------------------------------------------------------------------------
# 3. Normalization at small batches: BN, renorm, frozen BN over ghost batches; group, layer norm.


def small_batch_configs(base, ghost_sizes: Sequence[int], seeds: Sequence[int], epochs: int,
                        freeze_epochs: int) -> list:
  """Per seed: none, group, layer norm; per ghost size: BN (ghost), renorm (ghost, the paper's warm-up
  scaled to the run) and frozen BN (ghost BN, frozen with precise statistics for the last `freeze_epochs`).

  `base` gives the run's length in `steps` (`epochs` of them), so that renorm's warm-up scales to it.
  """
  configs = []
  groups = group_count(base.model, base.num_groups)
  for seed in seeds:
    configs += [dataclasses.replace(base, norm=norm, seed=seed, **(dict(num_groups=groups) if norm == 'group' else {}))
                for norm in ('none', 'group', 'layer')]
    for ghost in ghost_sizes:
      configs += [ghost_bn(base, ghost, seed=seed), ghost_renorm(base, ghost, seed=seed)]
      if freeze_epochs and epochs > freeze_epochs:
        configs.append(ghost_bn(base, ghost, seed=seed, freeze_bn_after=epochs - freeze_epochs, precise_bn=10_000))
  # canonical: a model's own settings the run does not use (BN momentum with group norm) go back to their defaults
  return [config_lib.validate(config_lib.canonical(c)) for c in configs]


def group_count(model: str, groups: int) -> int:
  """`groups`, or where it does not divide every norm width of the model, their greatest common divisor."""
  import math

  from bnjax.lab import registry

  widths = registry.entry(model).widths
  return groups if all(width % groups == 0 for width in widths) else math.gcd(groups, *widths)


def _kind(config: Mapping) -> str:
  if config['norm'] in ('bn', 'ghost'):
    return 'frozen BN' if config.get('freeze_bn_after') else 'BN'
  return {'renorm': 'renorm', 'group': 'group norm', 'layer': 'layer norm', 'none': 'no norm'}[config['norm']]


def study_small_batch_norms(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  batch = settings['batch_size']
  check_ghost_sizes(settings['ghost_sizes'], batch)
  part_of = lambda part_settings, epochs: (in_steps(config_lib.unchecked(part_settings), epochs), epochs)
  parts = {'MNIST MLP': part_of(dict(_MNIST, batch_size=batch, data_dir=data_dir), settings['mlp_epochs'])}
  if settings['cnn_epochs']:
    # A new study, no numbers to keep: the CNN takes the CPU fast paths (exactly XLA's layers off CPU).
    model = settings.get('model', 'cifar_cnn')
    if registry.canonical_name(model) == 'cifar_cnn':
      cifar = {k: v for k, v in CIFAR.items() if k != 'epochs'}
      parts['CIFAR-10 CNN'] = part_of(dict(cifar, batch_size=batch, data_dir=data_dir, conv_impl='cpu_fast'),
                                      settings['cnn_epochs'])
    else:  # another model, with its own training settings (bnjax.lab.registry) at this batch size
      own = config_lib.with_model_defaults(dict(model=model, norm='bn', batch_size=batch, data_dir=data_dir),
                                           keep=('epochs', 'steps'))
      parts[f'CIFAR-10 {model}'] = part_of(own, settings['cnn_epochs'])
  rows, results = [], {}
  plt = _plt()
  fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4), squeeze=False)
  for (label, (base, epochs)), ax in zip(parts.items(), axes[0]):
    mlp = label == 'MNIST MLP'  # the other part is the convolutional model
    seeds, freeze = (settings['seeds'], settings['freeze_epochs']) if mlp else (settings['cnn_seeds'],
                                                                               settings['cnn_freeze_epochs'])
    records = _sweep(small_batch_configs(base, settings['ghost_sizes'], seeds, epochs, freeze),
                     out / f'sweep_{label.split()[0].lower()}{"" if label.endswith(("MLP", "CNN")) else "_" + base.model}',
                     log)
    ghost_of = lambda c: c.get('virtual_batch_size') or c['batch_size']
    for index, kind in enumerate(('BN', 'renorm', 'frozen BN')):
      stats = [report_lib.mean_std([r.get('test_accuracy') for r in records if _kind(r['config']) == kind
                                    and ghost_of(r['config']) == g]) for g in settings['ghost_sizes']]
      if any(s[2] for s in stats):
        ax.errorbar(np.arange(len(stats)), [s[0] for s in stats], yerr=[s[1] for s in stats], marker='o', capsize=3,
                    color=f'C{index}', label=kind)
      for ghost, s in zip(settings['ghost_sizes'], stats):
        rows.append([label, kind, ghost, cell([r.get('test_accuracy') for r in records if _kind(r['config']) == kind
                                               and ghost_of(r['config']) == ghost])])
    for index, kind in enumerate(('group norm', 'layer norm', 'no norm')):
      accuracy = [r.get('test_accuracy') for r in records if _kind(r['config']) == kind]
      ax.axhline(report_lib.mean_std(accuracy)[0], color=f'C{index + 3}', linestyle='--', linewidth=1, label=kind)
      rows.append([label, kind, '-', cell(accuracy)])
    ax.set_xticks(np.arange(len(settings['ghost_sizes'])), [str(g) for g in settings['ghost_sizes']])
    ax.set_xlabel(f'examples per normalization batch (ghost batches of a batch of {base.batch_size})')
    ax.set_ylabel('test accuracy')
    ax.set_title(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    results[label] = [{k: r.get(k) for k in ('config', 'test_accuracy', 'test_accuracy_moving_stats',
                                              'test_accuracy_precise_stats')} for r in records]
  _save(fig, out / 'small_batch_norms.png')
  table = markdown_table(['model', 'normalization', 'examples per BN batch', 'test accuracy'], rows)
  return {'table': table, 'results': results}
