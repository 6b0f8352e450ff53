"""Reproductions: the source material's and the papers' studies, one command each (docs/results.md).

    python experiments/repro.py --study=seed000               # CPU budget
    python experiments/repro.py --study=fig1 --budget=full    # the paper's budget (GPU/TPU)

Each study trains with the project's own machinery (`experiment.run`,
`sweep.run_sweep`) on the data `data_dir` holds, and writes to
`<out>/<study>/`: `results.json` (every number, the settings, the hardware,
the wall time), `table.md` (the markdown table of docs/results.md) and PNG
plots. Re-running a study reuses the runs already finished there (sweeps skip
finished run ids; the CIFAR run resumes from its checkpoint).

A study's settings (epochs, seeds, grids) come from its budget: 'full' is the
source's or paper's budget, 'cpu' a smaller one that a 2-core machine runs in
minutes; `overrides` replace single settings (`--set=epochs=5`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from bnjax.lab import config as config_lib
from bnjax.lab import report as report_lib
from bnjax.lab import sweep as sweep_lib
from bnjax.lab.config import TrainConfig
from bnjax.lab.report import markdown_table

# The source's numbers, quoted in the tables and plots.
SEED000_KERAS = {'plain': (0.9793, 0.0007), 'bn': (0.9782, 0.0018)}  # test accuracy, 3 runs, on this data
SEED003_SOURCE_LOG = {1: 0.5887, 2: 0.6417, 3: 0.6533, 4: 0.6819, 8: 0.6963, 30: 0.6756}  # val accuracy by epoch
SEED003_KERAS_HERE = {1: 0.5819}  # the source's Keras code on this data, here

_MNIST = dict(dataset='mnist', model='mnist_mlp', optimizer='adam', learning_rate=1e-3, validation='test',
              scaling='unit')
# The source's CIFAR-10 study (seed003).
CIFAR = dict(dataset='cifar10', model='cifar_cnn', norm='bn', optimizer='adam', learning_rate=1e-4, epochs=30,
             batch_size=32, validation='0.3', validation_seed=777, scaling='standardize')
_CIFAR = CIFAR


# ----------------------------------------------------------------------------
# Small helpers.


def renorm_warmup_scaled(config: TrainConfig) -> TrainConfig:
  """The Batch Renorm paper's clipping schedule (plain BN for 5k steps, rmax at 40k, dmax at 25k of
  its 40k+), scaled to this run's length: 1/8, 1 and 5/8 of the run."""
  if config.norm != 'renorm' or config.steps is None:
    return config
  return dataclasses.replace(config, renorm_clipping='warmup', renorm_warmup_steps=config.steps // 8,
                             rmax_end_step=config.steps, dmax_end_step=config.steps * 5 // 8)


def cell(values: Sequence[float | None], digits: int = 4) -> str:
  """'0.9781 ± 0.0012 (3)' for a table (one run: '0.9781'); '-' when there is no finite value."""
  mean, std, n = report_lib.mean_std(values)
  if n == 0:
    return '-'
  if n == 1:
    return f'{mean:.{digits}f}'
  return f'{mean:.{digits}f} ± {std:.{digits}f} ({n})'


def _sweep(configs: Sequence[TrainConfig], folder: Path, log) -> list[dict]:
  """`sweep.run_sweep` (resumable, vmapped groups) in `folder`, records in the configs' order."""
  records = sweep_lib.run_sweep(configs, folder, command='bnjax.lab.repro', report=False, log=log)
  failed = [r for r in records if r['status'] == sweep_lib.STATUS_ERROR]
  if failed:
    raise RuntimeError(f'{len(failed)} run(s) failed, e.g. {failed[0].get("error")}')
  return records


def _mean_history(records: Sequence[dict]) -> list[dict]:
  """Per epoch, the mean over runs (seeds) of each metric, over the epochs every run completed."""
  histories = [r['history'] for r in records if r.get('history')]
  length = min(len(h) for h in histories)
  keys = ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy')
  return [{'epoch': e + 1, **{k: float(np.mean([h[e][k] for h in histories])) for k in keys}} for e in range(length)]


def _with(records: Sequence[dict], **fields) -> list[dict]:
  return [r for r in records if all(r['config'][k] == v for k, v in fields.items())]


def _save(fig, path: Path) -> None:
  """Writes a figure as a small PNG (docs/ commits them) and frees it."""
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  _plt().close(fig)


def _plt():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


# ----------------------------------------------------------------------------
# 1. MNIST MLP, plain vs BN (seed000), and BN momentum 0.9 / 0.6.


def study_seed000(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  from bnjax.lab import plots

  base = TrainConfig(**_MNIST, batch_size=500, epochs=settings['epochs'], data_dir=data_dir)
  variants = {'plain': dict(norm='none')}
  variants.update({f'bn (momentum {m:g})': dict(norm='bn', momentum=m) for m in settings['momenta']})
  configs = [config_lib.validate(dataclasses.replace(base, seed=seed, **v))
             for v in variants.values() for seed in settings['seeds']]
  records = _sweep(configs, out / 'sweep', log)
  by_variant = {name: _with(records, **fields) for name, fields in variants.items()}
  rows, results = [], {}
  for name, runs in by_variant.items():
    test = [r.get('test_accuracy_moving_stats') for r in runs]
    batch = [r.get('test_accuracy_batch_stats') for r in runs]
    best = [r.get('best_val_accuracy') for r in runs]
    reference = {'plain': SEED000_KERAS['plain'], 'bn (momentum 0.99)': SEED000_KERAS['bn']}.get(name)
    rows.append([name, cell(test), cell(batch) if runs[0]['config']['norm'] != 'none' else '-', cell(best),
                 f'{reference[0]:.4f} ± {reference[1]:.4f}' if reference else '-'])
    results[name] = {'test_accuracy': test, 'test_accuracy_batch_stats': batch, 'best_val_accuracy': best,
                     'mean_history': _mean_history(runs)}
  table = markdown_table(['model', 'test accuracy (moving stats)', 'test accuracy (batch stats)',
                          'best epoch test accuracy', 'source (Keras, this data)'], rows)
  first_bn = next(name for name in by_variant if name != 'plain')
  plots.plot_curves({'plain': results['plain']['mean_history'], 'BN': results[first_bn]['mean_history']},
                    out / 'seed000_curves.png',
                    title=f'MNIST MLP, plain vs BN (mean of {len(settings["seeds"])} seeds)')
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for index, (name, result) in enumerate(results.items()):
    history = result['mean_history']
    ax.plot([m['epoch'] for m in history], [m['val_accuracy'] for m in history], marker='o', markersize=3,
            color=f'C{index}', label=name)
  ax.set_xlabel('epoch')
  ax.set_ylabel('test accuracy (moving statistics)')
  ax.set_ylim(0.95, 0.99)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title('MNIST MLP at batch 500: BN momentum')
  _save(fig, out / 'seed000_momentum.png')
  return {'table': table, 'results': results}


# ----------------------------------------------------------------------------
# 2. CIFAR-10 CNN (seed003) against the source's log.


def study_seed003(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  from bnjax.lab import experiment

  config = config_lib.validate(TrainConfig(**{**_CIFAR, 'epochs': settings['epochs'], 'seed': settings['seed'],
                                              'data_dir': data_dir, 'workdir': str(out / 'run')}))
  summary = experiment.run(config, resume='auto', progress=False, log=log, folder_flag=None)
  history = [json.loads(line) for line in (out / 'run' / 'metrics.jsonl').read_text().splitlines()][: config.epochs]
  ours = {m['epoch']: m['val_accuracy'] for m in history}
  epochs = sorted(set(SEED003_SOURCE_LOG) | {1, 2, 3, 4, 8} | {max(ours)})
  rows = [[e, f'{ours[e]:.4f}' if e in ours else '(not run)', f'{SEED003_SOURCE_LOG[e]:.4f}' if e in SEED003_SOURCE_LOG
           else '-', f'{SEED003_KERAS_HERE[e]:.4f}' if e in SEED003_KERAS_HERE else '-'] for e in epochs]
  best = max(history, key=lambda m: m['val_accuracy'])
  rows.append(['best', f'{best["val_accuracy"]:.4f} (epoch {best["epoch"]})', '0.6963 (epoch 8)', '-'])
  table = markdown_table(['epoch', 'bnjax val accuracy', 'source log', 'source Keras code, here'], rows)
  plt = _plt()
  fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
  epochs_run = [m['epoch'] for m in history]
  ax_acc.plot(epochs_run, [m['train_accuracy'] for m in history], 'C0--', label='bnjax train')
  ax_acc.plot(epochs_run, [m['val_accuracy'] for m in history], 'C0o-', markersize=3, label='bnjax validation')
  ax_acc.plot(list(SEED003_SOURCE_LOG), list(SEED003_SOURCE_LOG.values()), 'C3s', label='source log (validation)')
  ax_acc.set_ylabel('accuracy')
  ax_loss.plot(epochs_run, [m['train_loss'] for m in history], 'C0--', label='bnjax train')
  ax_loss.plot(epochs_run, [m['val_loss'] for m in history], 'C0o-', markersize=3, label='bnjax validation')
  ax_loss.set_ylabel('loss')
  for ax in (ax_acc, ax_loss):
    ax.set_xlabel('epoch')
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(f'CIFAR-10 CNN with BN (Adam 1e-4, batch 32): {len(history)} of 30 epochs')
  _save(fig, out / 'seed003_curves.png')
  return {'table': table, 'results': {'history': history, 'summary': summary}}


# ----------------------------------------------------------------------------
# 3. Ioffe & Szegedy 2015, Figure 1: test accuracy and a sigmoid's input over training.


def _fig1_config(norm: str, settings: Mapping, data_dir: str | None) -> TrainConfig:
  return config_lib.validate(TrainConfig(
      dataset='mnist', model='mlp_bn_paper', activation='sigmoid', norm=norm, optimizer='sgd',
      learning_rate=settings['learning_rate'], batch_size=settings['batch_size'], steps=settings['steps'],
      seed=settings['seed'], data_dir=data_dir, validation='test', scaling='unit'))


def train_tracked(config: TrainConfig, dataset, every: int, log) -> dict:
  """Trains `config` for its steps; every `every` steps (and at step 0) measures the test accuracy and
  the 15/50/85th percentiles of the last block's unit-0 activation input on the test set, at inference
  (`percentiles`) and with the test set's own batch statistics (`percentiles_batch_stats`).

  Returns `{'step': [T], 'test_accuracy': [T], 'percentiles': [T, 3], 'percentiles_batch_stats': [T, 3]}` (lists).
  """
  import jax

  from bnjax.lab import build, diagnostics, engine, loop, programs

  program = programs.single(config, dataset)
  model = build.model(config)
  evaluate = engine.make_evaluate(model, batch_size=config.eval_batch_size)

  @jax.jit
  def measure(state):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    accuracy = evaluate(state, dataset.test_images, dataset.test_labels).accuracy()
    return (accuracy, diagnostics.activation_percentiles(model, variables, dataset.test_images),
            diagnostics.activation_percentiles(model, variables, dataset.test_images, train=True,
                                               rng=jax.random.PRNGKey(0)))

  track = {'step': [], 'test_accuracy': [], 'percentiles': [], 'percentiles_batch_stats': []}

  def record(step, state):
    accuracy, percentiles, batch_percentiles = jax.device_get(measure(state))
    track['step'].append(step)
    track['test_accuracy'].append(float(accuracy))
    track['percentiles'].append([float(p) for p in percentiles])
    track['percentiles_batch_stats'].append([float(p) for p in batch_percentiles])
    if len(track['step']) % 20 == 1 or step == program.plan.total_steps:
      log(f'{config.norm}: step {step}/{program.plan.total_steps}  test accuracy {track["test_accuracy"][-1]:.4f}')

  loop.train(program, every_steps=(every, record), progress=False, log=lambda message: None)
  return track


def study_fig1(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  import jax

  from bnjax.lab import build

  tracks = {}
  dataset = None
  for norm in ('none', 'bn'):
    config = _fig1_config(norm, settings, data_dir)
    path = out / f'track_{norm}.json'
    cached = json.loads(path.read_text()) if path.exists() else {}
    if cached.get('config') == config.to_dict():
      tracks[norm] = cached['track']
      continue
    dataset = dataset or build.dataset(config, put=jax.device_put)
    tracks[norm] = train_tracked(config, dataset, settings['every'], log)
    path.write_text(json.dumps({'config': config.to_dict(), 'track': tracks[norm]}))
  marks = [s for s in (1000, 2000, 5000, 10000, 20000, 50000) if s <= settings['steps']]
  if settings['steps'] not in marks:
    marks.append(settings['steps'])
  rows = []
  for mark in marks:
    row = [mark]
    for norm in ('none', 'bn'):
      track = tracks[norm]
      index = min(range(len(track['step'])), key=lambda i: abs(track['step'][i] - mark))
      row.append(f'{track["test_accuracy"][index]:.4f}')
    rows.append(row)
  spread = {norm: [p[2] - p[0] for p in tracks[norm]['percentiles']] for norm in tracks}
  drift = {norm: [p[1] for p in tracks[norm]['percentiles']] for norm in tracks}
  stats_rows = [[label, f'{np.ptp(drift[n]):.3f}', f'{min(spread[n]):.3f} .. {max(spread[n]):.3f}']
                for label, n in (('without BN', 'none'), ('with BN', 'bn'))]
  table = (markdown_table(['step', 'test accuracy without BN', 'test accuracy with BN'], rows) + '\n\n' +
           markdown_table(['last-layer sigmoid input (unit 0, test set)', 'range of the median over training',
                           '85th - 15th percentile over training'], stats_rows))
  plt = _plt()
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  for norm, label, color in (('none', 'Without BN', 'C0'), ('bn', 'With BN', 'C3')):
    axes[0].plot(tracks[norm]['step'], tracks[norm]['test_accuracy'], color=color, label=label)
  axes[0].set_ylim(0.7, 1.0)
  axes[0].set_xlabel('training step')
  axes[0].set_ylabel('test accuracy')
  axes[0].legend()
  axes[0].set_title('(a)')
  for ax, norm, title in ((axes[1], 'none', '(b) without BN'), (axes[2], 'bn', '(c) with BN')):
    percentiles = np.asarray(tracks[norm]['percentiles'])
    for column, style in zip(range(3), ('--', '-', '--')):
      ax.plot(tracks[norm]['step'], percentiles[:, column], 'k' + style, linewidth=1,
              label='inference (moving statistics)' if column == 1 and norm == 'bn' else None)
    if norm == 'bn':
      batch = np.asarray(tracks[norm]['percentiles_batch_stats'])
      for column, style in zip(range(3), ('--', '-', '--')):
        ax.plot(tracks[norm]['step'], batch[:, column], 'C3' + style, linewidth=1, alpha=0.8,
                label='batch statistics of the test set' if column == 1 else None)
      ax.legend(loc='lower right', fontsize=8)
    ax.set_title(title)
    ax.set_xlabel('training step')
    ax.set_ylabel('sigmoid input (15/50/85th pct)')
  low = min(np.min(tracks[n]['percentiles']) for n in tracks)
  high = max(np.max(tracks[n]['percentiles']) for n in tracks)
  for ax in axes[1:]:
    ax.set_ylim(low - 0.1 * abs(high - low), high + 0.1 * abs(high - low))
  for ax in axes:
    ax.grid(alpha=0.3)
  _save(fig, out / 'fig1.png')
  return {'table': table, 'results': {'tracks': tracks}}


# ----------------------------------------------------------------------------
# 4. Momentum x batch size.


def study_momentum_batch(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  base = TrainConfig(**_MNIST, norm='bn', epochs=settings['epochs'], data_dir=data_dir)
  grid = dict(momentum=list(settings['momenta']), momentum_schedule=['constant', 'inverse_decay'],
              batch_size=list(settings['batch_sizes']), seed=list(settings['seeds']))
  configs, _ = sweep_lib.expand_grid(base, grid)
  records = _sweep(configs, out / 'sweep', log)
  rows = [dict(sweep_lib.result_row(r)) for r in records]
  report_lib.plot_heatmap(rows, out / 'momentum_batch_accuracy.png',
                          title=f'test accuracy, moving statistics ({settings["epochs"]} epochs)')
  report_lib.plot_heatmap(rows, out / 'momentum_batch_stats_gap.png', 'stats_gap',
                          'test accuracy: batch statistics - moving statistics')
  momenta = report_lib.sorted_labels({report_lib.momentum_label(r) for r in rows})
  accuracy = report_lib.aggregate(rows, ['batch_size', 'momentum'])
  gap = report_lib.aggregate(rows, ['batch_size', 'momentum'], 'stats_gap')
  table_rows = []
  for batch in sorted({r['batch_size'] for r in rows}):
    best = max(momenta, key=lambda m: accuracy[(batch, m)][0])
    table_rows.append([batch] + [('**' if m == best else '') + f'{accuracy[(batch, m)][0]:.4f}' +
                                 ('**' if m == best else '') + f' ({gap[(batch, m)][0]:+.4f})' for m in momenta])
  table = markdown_table(['batch size'] + [f'momentum {m}' for m in momenta], table_rows)
  return {'table': table, 'results': {'rows': [{k: r[k] for k in ('batch_size', 'momentum', 'momentum_schedule',
                                                                    'seed', 'test_accuracy_moving_stats',
                                                                    'test_accuracy_batch_stats', 'stats_gap')}
                                               for r in rows]}}


# ----------------------------------------------------------------------------
# 5. Dropout placement and the variance shift.

PLACEMENTS = ('none', 'before_norm', 'after_norm', 'end')


def _dropout_configs(base: TrainConfig, placements: Sequence[str], rates: Sequence[float], norms: Sequence[str],
                     seeds: Sequence[int]):
  configs, _ = sweep_lib.expand_grid(base, dict(dropout_placement=list(placements), dropout_rate=[0.0] + list(rates),
                                                norm=list(norms), seed=list(seeds)))
  return configs


def shift_at_init(config: TrainConfig, images) -> dict:
  """`diagnostics.shift_summary` of `config`'s model at initialization, its moving statistics set to
  one training-mode pass over `images` (as if training had just begun and momentum were 0)."""
  import jax

  from bnjax.lab import build, diagnostics

  model = build.model(dataclasses.replace(config, momentum=0.0))
  images = diagnostics.probe_examples(images, config.virtual_batch_size)

  @jax.jit  # one program (op by op, a CNN's passes took seconds each)
  def shift(images, key):
    variables = model.init(key, images[: config.virtual_batch_size or 2], train=False)
    variables = diagnostics.with_batch_statistics(model, variables, images, jax.random.fold_in(key, 1))
    return diagnostics.variance_shift(model, variables, images, jax.random.fold_in(key, 2))

  return diagnostics.shift_summary(shift(images, jax.random.PRNGKey(config.seed)))


def _add_shift_at_init(records: Sequence[dict]) -> None:
  """Adds `variance_shift_at_init` (and its blocks) to each record: seed 0's model of its setting."""
  import jax

  from bnjax.lab import build

  cache: dict[str, dict] = {}
  images = None
  for record in records:
    config = TrainConfig(**{**record['config'], 'seed': 0})
    key = sweep_lib.run_id(config)
    if key not in cache:
      images = images if images is not None else build.dataset(config).test_images
      cache[key] = shift_at_init(config, jax.numpy.asarray(images))
    record['variance_shift_at_init'] = cache[key]['variance_shift']
    record['variance_shift_at_init_blocks'] = cache[key]['variance_shift_blocks']


def _dropout_rows(records: Sequence[dict], label: str) -> list[list]:
  rows = []
  keys = dict.fromkeys((r['config']['norm'], r['config']['dropout_placement'], r['config']['dropout_rate'])
                       for r in records)
  for norm, placement, rate in keys:
    runs = _with(records, norm=norm, dropout_placement=placement, dropout_rate=rate)
    rows.append([label, norm, placement, f'{rate:g}' if placement != 'none' else '-',
                 cell([r.get('test_accuracy_moving_stats') for r in runs]),
                 cell([r.get('test_accuracy_batch_stats') for r in runs]) if norm != 'none' else '-',
                 f"{runs[0]['variance_shift_at_init']:.3f}", cell([r.get('variance_shift') for r in runs], 3),
                 cell([r.get('moving_variance_ratio') for r in runs], 3) if norm != 'none' else '-'])
  return rows


def _plot_dropout(parts: Mapping[str, Sequence[dict]], placements: Sequence[str], path: Path) -> None:
  plt = _plt()
  fig, axes = plt.subplots(len(parts), 2, figsize=(12, 3.6 * len(parts)), squeeze=False)
  for (label, records), (ax_acc, ax_shift) in zip(parts.items(), axes):
    bn = [r for r in records if r['config']['norm'] != 'none']
    rates = sorted({r['config']['dropout_rate'] for r in bn if r['config']['dropout_placement'] != 'none'})
    width = 0.8 / max(len(rates), 1)
    for j, rate in enumerate(rates):
      for ax, metric in ((ax_acc, 'test_accuracy_moving_stats'), (ax_shift, 'variance_shift')):
        runs = [_with(bn, dropout_placement=p, dropout_rate=rate if p != 'none' else 0.0) for p in placements]
        stats = [report_lib.mean_std([r.get(metric) for r in at]) for at in runs]
        ax.bar(np.arange(len(placements)) + j * width, [s[0] for s in stats], width, yerr=[s[1] for s in stats],
               capsize=3, label=f'rate {rate:g}', color=f'C{j}')
    for ax, ylabel in ((ax_acc, 'test accuracy (moving stats)'), (ax_shift, 'variance shift (train/inference)')):
      ax.set_xticks(np.arange(len(placements)) + width * (len(rates) - 1) / 2, placements)
      ax.set_ylabel(ylabel)
      ax.set_title(f'{label}, BN')
      ax.grid(alpha=0.3, axis='y')
      ax.legend()
    values = [r.get('test_accuracy_moving_stats') or 0 for r in bn]
    ax_acc.set_ylim(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.02))
    ax_shift.axhline(1.0, color='k', linewidth=0.8)
  _save(fig, path)


def study_dropout(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  parts = {}
  mnist = TrainConfig(**_MNIST, batch_size=500, epochs=settings['mlp_epochs'], data_dir=data_dir)
  grid = settings['placements'], settings['rates']
  parts['mlp_seed (MNIST)'] = _sweep(_dropout_configs(mnist, *grid, ('none', 'bn'), settings['seeds']),
                                     out / 'sweep_mlp', log)
  if settings['cnn_epochs']:
    cifar = TrainConfig(**{**_CIFAR, 'epochs': settings['cnn_epochs'], 'data_dir': data_dir})
    parts['cnn_seed (CIFAR-10)'] = _sweep(_dropout_configs(cifar, *grid, ('bn',), settings['cnn_seeds']),
                                          out / 'sweep_cnn', log)
  for records in parts.values():
    _add_shift_at_init(records)
  rows = [row for label, records in parts.items() for row in _dropout_rows(records, label)]
  table = markdown_table(['model', 'norm', 'dropout', 'rate', 'test acc (moving stats)', 'test acc (batch stats)',
                          'variance shift at init', 'variance shift, trained', 'moving var / inference var'], rows)
  _plot_dropout(parts, settings['placements'], out / 'dropout.png')
  return {'table': table, 'results': {label: [{k: r.get(k) for k in ('config', 'test_accuracy_moving_stats',
                                                                       'test_accuracy_batch_stats', 'variance_shift',
                                                                       'variance_shift_blocks',
                                                                       'moving_variance_ratio',
                                                                       'moving_variance_ratio_blocks',
                                                                       'variance_shift_at_init',
                                                                       'variance_shift_at_init_blocks')}
                                              for r in records] for label, records in parts.items()}}


# ----------------------------------------------------------------------------
# 6. Batch renorm at small (ghost) batches.


def in_steps(config: TrainConfig, epochs: int) -> TrainConfig:
  """`config` trained for `epochs` epochs, said in steps (so that renorm's clipping warm-up can be scaled to
  the run: `renorm_warmup_scaled`)."""
  from bnjax.lab import build

  steps = epochs * build.steps_per_epoch(config, build.dataset(config).train_images.shape[0])
  return dataclasses.replace(config, steps=steps, epochs=config_lib.DEFAULTS.epochs)


def ghost_bn(base: TrainConfig, ghost: int, **fields) -> TrainConfig:
  """BN with statistics over ghost batches of `ghost` examples (plain BN when that is the whole batch)."""
  norm = dict(norm='bn') if ghost == base.batch_size else dict(norm='ghost', virtual_batch_size=ghost)
  return dataclasses.replace(base, **norm, **fields)


def ghost_renorm(base: TrainConfig, ghost: int, **fields) -> TrainConfig:
  """Batch renorm over ghost batches of `ghost` examples, with the paper's warm-up scaled to the run."""
  return renorm_warmup_scaled(dataclasses.replace(base, norm='renorm', virtual_batch_size=ghost, **fields))


def check_ghost_sizes(ghost_sizes: Sequence[int], batch_size: int) -> None:
  """A study's `--ghost_sizes` must each be a divisor of its `--batch_size` of at least 2: one line naming them."""
  bad = [g for g in ghost_sizes if g < 2 or batch_size % g]
  if bad:
    raise ValueError(f'--ghost_sizes={",".join(map(str, ghost_sizes))} is invalid: {", ".join(map(str, bad))} '
                     f'{"is" if len(bad) == 1 else "are"} not a divisor of --batch_size={batch_size} of at least 2 '
                     '(each ghost batch takes that many examples of a batch).')


def study_renorm(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  batch = settings['batch_size']
  check_ghost_sizes(settings['ghost_sizes'], batch)
  base = in_steps(TrainConfig(**_MNIST, batch_size=batch, data_dir=data_dir), settings['epochs'])
  configs = []
  for seed in settings['seeds']:
    configs.append(dataclasses.replace(base, norm='none', seed=seed))
    for ghost in settings['ghost_sizes']:
      configs += [ghost_bn(base, ghost, seed=seed), ghost_renorm(base, ghost, seed=seed)]
  configs = [config_lib.validate(c) for c in configs]
  records = _sweep(configs, out / 'sweep', log)
  kinds = {'bn': lambda c: c['norm'] in ('bn', 'ghost'), 'renorm': lambda c: c['norm'] == 'renorm'}
  ghost_of = lambda c: c['virtual_batch_size'] or c['batch_size']
  none_runs = [r for r in records if r['config']['norm'] == 'none']
  rows = []
  series: dict[str, list] = {'BN': [], 'renorm': []}
  for ghost in settings['ghost_sizes']:
    row = [ghost]
    for label, kind in (('BN', 'bn'), ('renorm', 'renorm')):
      runs = [r for r in records if kinds[kind](r['config']) and ghost_of(r['config']) == ghost]
      moving = [r.get('test_accuracy_moving_stats') for r in runs]
      row += [cell(moving), cell([r.get('test_accuracy_batch_stats') for r in runs])]
      series[label].append(report_lib.mean_std(moving))
    row.append(cell([r.get('test_accuracy_moving_stats') for r in none_runs]))
    rows.append(row)
  table = markdown_table(['BN batch (ghost) size', 'BN: moving stats', 'BN: batch stats', 'renorm: moving stats',
                          'renorm: batch stats', 'no norm'], rows)
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  x = np.arange(len(settings['ghost_sizes']))
  for index, (label, stats) in enumerate(series.items()):
    ax.errorbar(x, [s[0] for s in stats], yerr=[s[1] for s in stats], marker='o', capsize=3, label=label,
                color=f'C{index}')
  none_mean = report_lib.mean_std([r.get('test_accuracy_moving_stats') for r in none_runs])[0]
  ax.axhline(none_mean, color='k', linestyle='--', linewidth=1, label='no norm')
  ax.set_xticks(x, [str(g) for g in settings['ghost_sizes']])
  ax.set_xlabel(f'examples per BN batch (ghost batches of a batch of {batch})')
  ax.set_ylabel('test accuracy (moving statistics)')
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(f'MNIST MLP, {base.steps} steps')
  _save(fig, out / 'renorm.png')
  return {'table': table, 'results': [{k: r.get(k) for k in ('config', 'test_accuracy_moving_stats',
                                                              'test_accuracy_batch_stats', 'best_val_accuracy')}
                                      for r in records]}


# ----------------------------------------------------------------------------
# 7. The moving-statistics bug, and center/scale off after the nonlinearity.

BUG_VARIANTS = {
    'BN before ReLU (the usual order)': dict(norm='bn'),
    'BN, moving statistics never updated (--update_stats=false)': dict(norm='bn', update_stats=False),
    'BN after ReLU, center/scale on': dict(norm='bn', norm_position='after_activation'),
    'BN after ReLU, center/scale off': dict(norm='bn', norm_position='after_activation', center=False, scale=False),
    'BN before ReLU, center/scale off': dict(norm='bn', center=False, scale=False),
}


def study_bug(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  base = TrainConfig(**_MNIST, batch_size=500, epochs=settings['epochs'], data_dir=data_dir)
  configs = [config_lib.validate(dataclasses.replace(base, seed=seed, **fields))
             for fields in BUG_VARIANTS.values() for seed in settings['seeds']]
  records = _sweep(configs, out / 'sweep', log)
  rows, results = [], {}
  for name, fields in BUG_VARIANTS.items():
    runs = _with(records, **{**dict(norm_position='before_activation', center=True, scale=True, update_stats=True),
                            **fields})
    moving = [r.get('test_accuracy_moving_stats') for r in runs]
    batch = [r.get('test_accuracy_batch_stats') for r in runs]
    rows.append([name, cell(moving), cell(batch)])
    results[name] = {'test_accuracy_moving_stats': moving, 'test_accuracy_batch_stats': batch}
  table = markdown_table(['model (MNIST MLP, batch 500)', 'test acc, moving statistics (inference)',
                          'test acc, batch statistics'], rows)
  return {'table': table, 'results': results}
