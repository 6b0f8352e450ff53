"""Normalization at 2..32 examples per batch: BN, batch renorm and frozen BN over ghost batches, against group
norm, layer norm and no norm, on the MNIST MLP and the CIFAR-10 CNN (or another `--model`)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Mapping, Sequence

from bnjax.lab import config as config_lib
from bnjax.lab import registry
from bnjax.lab import report as report_lib
from bnjax.lab.report import markdown_table
from bnjax.lab.study import Study
from bnjax.lab.study_common import (CIFAR, MNIST, cell, check_ghost_sizes, ghost_bn, ghost_renorm, in_steps,
                                    sweep_records)

GHOST_KINDS = ('BN', 'renorm', 'frozen BN')  # normalized over ghost batches
WHOLE_KINDS = ('group norm', 'layer norm', 'no norm')  # no batch statistics
RECORD_KEYS = ('config', 'test_accuracy', 'test_accuracy_moving_stats', 'test_accuracy_precise_stats')


def group_count(model: str, groups: int) -> int:
  """`groups`, or where it does not divide every norm width of the model, their greatest common divisor."""
  widths = registry.entry(model).widths
  return groups if all(width % groups == 0 for width in widths) else math.gcd(groups, *widths)


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


def kind_of(config: Mapping) -> str:
  """One of `GHOST_KINDS` or `WHOLE_KINDS`."""
  if config['norm'] in ('bn', 'ghost'):
    return 'frozen BN' if config.get('freeze_bn_after') else 'BN'
  return {'renorm': 'renorm', 'group': 'group norm', 'layer': 'layer norm', 'none': 'no norm'}[config['norm']]


def parts_of(settings: Mapping, data_dir: str | None) -> dict:
  """`{label: (base config in steps, epochs)}`: the MNIST MLP and, with `cnn_epochs`, the convolutional model."""
  batch = settings['batch_size']
  part_of = lambda part_settings, epochs: (in_steps(config_lib.unchecked(part_settings), epochs), epochs)
  parts = {'MNIST MLP': part_of(dict(MNIST, scaling='unit', batch_size=batch, data_dir=data_dir),
                                settings['mlp_epochs'])}
  if settings['cnn_epochs']:
    # A new study, no numbers to keep: the CNN takes the CPU fast paths (exactly XLA's layers off CPU).
    model = settings.get('model', 'cifar_cnn')
    if model == 'cifar_cnn':
      cifar = {k: v for k, v in CIFAR.items() if k != 'epochs'}
      parts['CIFAR-10 CNN'] = part_of(dict(cifar, batch_size=batch, data_dir=data_dir, conv_impl='cpu_fast'),
                                      settings['cnn_epochs'])
    else:  # another model, with its own training settings (bnjax.lab.registry) at this batch size
      own = config_lib.with_model_defaults(dict(model=model, norm='bn', batch_size=batch, data_dir=data_dir),
                                           keep=('epochs', 'steps'))
      parts[f'CIFAR-10 {model}'] = part_of(own, settings['cnn_epochs'])
  return parts


def run(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  from bnjax.lab import plots

  check_ghost_sizes(settings['ghost_sizes'], settings['batch_size'])
  rows, results, panels = [], {}, {}
  for label, (base, epochs) in parts_of(settings, data_dir).items():
    mlp = label == 'MNIST MLP'  # the other part is the convolutional model
    seeds, freeze = (settings['seeds'], settings['freeze_epochs']) if mlp else (settings['cnn_seeds'],
                                                                               settings['cnn_freeze_epochs'])
    folder = f'sweep_{label.split()[0].lower()}{"" if label.endswith(("MLP", "CNN")) else "_" + base.model}'
    records = sweep_records(small_batch_configs(base, settings['ghost_sizes'], seeds, epochs, freeze), out / folder,
                            log)
    ghost_of = lambda c: c.get('virtual_batch_size') or c['batch_size']
    accuracy = lambda kind, ghost=None: [r.get('test_accuracy') for r in records if kind_of(r['config']) == kind
                                         and (ghost is None or ghost_of(r['config']) == ghost)]
    series = {kind: [report_lib.mean_std(accuracy(kind, g)) for g in settings['ghost_sizes']] for kind in GHOST_KINDS}
    rows += [[label, kind, ghost, cell(accuracy(kind, ghost))] for kind in GHOST_KINDS
             for ghost in settings['ghost_sizes']]
    rows += [[label, kind, '-', cell(accuracy(kind))] for kind in WHOLE_KINDS]
    lines = {kind: (report_lib.mean_std(accuracy(kind))[0], f'C{index + len(GHOST_KINDS)}')
             for index, kind in enumerate(WHOLE_KINDS)}
    panels[label] = {'series': series, 'lines': lines,
                     'xlabel': f'examples per normalization batch (ghost batches of a batch of {base.batch_size})'}
    results[label] = [{k: r.get(k) for k in RECORD_KEYS} for r in records]
  plots.plot_accuracy_by_ghost_size(panels, settings['ghost_sizes'], out / 'small_batch_norms.png')
  table = markdown_table(['model', 'normalization', 'examples per BN batch', 'test accuracy'], rows)
  return {'table': table, 'results': results}


STUDY = Study('small_batch_norms', 'Normalization at 2/4/8/32 examples per batch: BN, renorm and frozen BN over ghost '
              'batches vs group norm, layer norm and none; MNIST MLP and CIFAR-10 CNN.', run,
              {'cpu': dict(batch_size=128, ghost_sizes=[2, 4, 8, 32], mlp_epochs=20, seeds=[0, 1, 2], cnn_epochs=2,
                           cnn_seeds=[0], freeze_epochs=2, cnn_freeze_epochs=1, model='cifar_cnn'),
               'full': dict(batch_size=128, ghost_sizes=[2, 4, 8, 32], mlp_epochs=20, seeds=[0, 1, 2], cnn_epochs=30,
                            cnn_seeds=[0, 1, 2], freeze_epochs=2, cnn_freeze_epochs=2, model='cifar_cnn')})
