"""Plots of training histories and of the studies' results (matplotlib, written to PNG files; no display needed).

The studies' figures (`bnjax.lab.studies`) are written at 90 dpi: docs/ commits them."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_curves(histories: Mapping[str, Sequence[Mapping]], path: str | Path, title: str = '') -> Path:
  """Train/validation loss and accuracy per epoch, one line style per run, as the sources plot them.

  Args:
    histories: `{run name: [metrics of epoch 1, 2, ...]}`, each a dict with
      `epoch`, `train_loss`, `train_accuracy`, `val_loss`, `val_accuracy`.
    path: the PNG to write.
    title: figure title.
  """
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for index, (name, history) in enumerate(histories.items()):
    color = f'C{index}'
    label = f'{name} ' if len(histories) > 1 else ''
    epochs = [m['epoch'] for m in history]
    for ax, key in ((ax_loss, 'loss'), (ax_acc, 'accuracy')):
      ax.plot(epochs, [m[f'train_{key}'] for m in history], color=color, linestyle='--', label=f'{label}train')
      ax.plot(epochs, [m[f'val_{key}'] for m in history], color=color, marker='o', markersize=3, label=f'{label}validation')
  for ax, key in ((ax_loss, 'loss'), (ax_acc, 'accuracy')):
    _label_axes(ax, 'epoch', key)
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def _label_axes(ax, xlabel: str, ylabel: str) -> None:
  """Axis labels, a light grid, integer ticks on x (epochs, severities) and the legend."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.legend()


STUDY_DPI = 90


def _save(fig, path: str | Path, dpi: int = 100) -> Path:
  """Lays the figure out, writes it as a PNG and closes it."""
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def plot_error_vs_severity(curves: Mapping[str, Sequence[float]], severities: Sequence[int], path: str | Path,
                           title: str = '', clean: Mapping[str, float] | None = None) -> Path:
  """Test error vs corruption severity, one line per method (`clean`: its error at severity 0)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for index, (method, errors) in enumerate(curves.items()):
    xs, ys = list(severities), list(errors)
    if clean is not None and method in clean:
      xs, ys = [0] + xs, [clean[method]] + ys
    ax.plot(xs, ys, marker='o', color=f'C{index}', label=method)
  _label_axes(ax, 'severity (0: clean)', 'test error')
  if title:
    ax.set_title(title)
  return _save(fig, path)


def plot_corruption_bars(errors: Mapping[str, Mapping[str, float]], path: str | Path, title: str = '') -> Path:
  """Test error per corruption (`{corruption: {method: error}}`), one bar per method."""
  corruptions = list(errors)
  methods = list(next(iter(errors.values()))) if errors else []
  width = 0.8 / max(len(methods), 1)
  fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(corruptions) * max(len(methods), 1) * 0.4 + 2), 4))
  for index, method in enumerate(methods):
    xs = [i + (index - (len(methods) - 1) / 2) * width for i in range(len(corruptions))]
    ax.bar(xs, [errors[c][method] for c in corruptions], width, color=f'C{index}', label=method)
  ax.set_xticks(range(len(corruptions)))
  ax.set_xticklabels(corruptions, rotation=45, ha='right')
  ax.set_ylabel('test error')
  ax.grid(alpha=0.3, axis='y')
  ax.legend()
  if title:
    ax.set_title(title)
  return _save(fig, path)


# ----------------------------------------------------------------------------
# The studies' figures.


def plot_accuracy_per_epoch(histories: Mapping[str, Sequence[Mapping]], path: str | Path, title: str,
                            ylim: tuple[float, float]) -> Path:
  """Validation accuracy per epoch, one line per run (`{run: [{'epoch', 'val_accuracy', ...}]}`)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for index, (name, history) in enumerate(histories.items()):
    ax.plot([m['epoch'] for m in history], [m['val_accuracy'] for m in history], marker='o', markersize=3,
            color=f'C{index}', label=name)
  ax.set_xlabel('epoch')
  ax.set_ylabel('test accuracy (moving statistics)')
  ax.set_ylim(*ylim)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(title)
  return _save(fig, path, STUDY_DPI)


def plot_against_source_log(history: Sequence[Mapping], source_log: Mapping[int, float], path: str | Path,
                            title: str) -> Path:
  """Accuracy and loss per epoch of one run (train and validation) beside a source's logged validation accuracy
  (`{epoch: accuracy}`)."""
  fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
  epochs = [m['epoch'] for m in history]
  ax_acc.plot(epochs, [m['train_accuracy'] for m in history], 'C0--', label='bnjax train')
  ax_acc.plot(epochs, [m['val_accuracy'] for m in history], 'C0o-', markersize=3, label='bnjax validation')
  ax_acc.plot(list(source_log), list(source_log.values()), 'C3s', label='source log (validation)')
  ax_acc.set_ylabel('accuracy')
  ax_loss.plot(epochs, [m['train_loss'] for m in history], 'C0--', label='bnjax train')
  ax_loss.plot(epochs, [m['val_loss'] for m in history], 'C0o-', markersize=3, label='bnjax validation')
  ax_loss.set_ylabel('loss')
  for ax in (ax_acc, ax_loss):
    ax.set_xlabel('epoch')
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  return _save(fig, path, STUDY_DPI)


def plot_figure1(tracks: Mapping[str, Mapping], path: str | Path) -> Path:
  """Ioffe & Szegedy 2015, Figure 1: (a) test accuracy over training with and without BN; (b, c) the 15/50/85th
  percentiles of a sigmoid's input over training without and with BN (with BN also under the test set's own
  batch statistics).

  Args:
    tracks: `{'none' | 'bn': {'step': [T], 'test_accuracy': [T], 'percentiles': [T, 3],
      'percentiles_batch_stats': [T, 3]}}`.
    path: the PNG to write.
  """
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
  return _save(fig, path, STUDY_DPI)


def plot_dropout_bars(panels: Mapping[str, Mapping], placements: Sequence[str], path: str | Path) -> Path:
  """Per model, BN's test accuracy and variance shift per dropout placement, one bar per rate with its std.

  Args:
    panels: `{model: {'accuracy': {rate: [(mean, std)] per placement}, 'shift': {rate: [(mean, std)]},
      'accuracy_range': (lowest, highest accuracy of its runs)}}`.
    placements: the placements, in the order of the bars.
    path: the PNG to write.
  """
  fig, axes = plt.subplots(len(panels), 2, figsize=(12, 3.6 * len(panels)), squeeze=False)
  for (label, panel), (ax_acc, ax_shift) in zip(panels.items(), axes):
    rates = list(panel['accuracy'])
    width = 0.8 / max(len(rates), 1)
    for j, rate in enumerate(rates):
      for ax, metric in ((ax_acc, 'accuracy'), (ax_shift, 'shift')):
        stats = panel[metric][rate]
        ax.bar(np.arange(len(placements)) + j * width, [s[0] for s in stats], width, yerr=[s[1] for s in stats],
               capsize=3, label=f'rate {rate:g}', color=f'C{j}')
    for ax, ylabel in ((ax_acc, 'test accuracy (moving stats)'), (ax_shift, 'variance shift (train/inference)')):
      ax.set_xticks(np.arange(len(placements)) + width * (len(rates) - 1) / 2, placements)
      ax.set_ylabel(ylabel)
      ax.set_title(f'{label}, BN')
      ax.grid(alpha=0.3, axis='y')
      ax.legend()
    lowest, highest = panel['accuracy_range']
    ax_acc.set_ylim(max(0.0, lowest - 0.05), min(1.0, highest + 0.02))
    ax_shift.axhline(1.0, color='k', linewidth=0.8)
  return _save(fig, path, STUDY_DPI)


def plot_accuracy_by_ghost_size(panels: Mapping[str, Mapping], ghost_sizes: Sequence[int], path: str | Path,
                                ylabel: str = 'test accuracy') -> Path:
  """Test accuracy against the examples per normalization batch, one panel per model.

  Args:
    panels: `{title: {'series': {label: [(mean, std, n)] per ghost size}, 'lines': {label: (mean, color)},
      'xlabel': str}}`: `series` as error bars (left out where no run has a value), `lines` (methods without
      ghost batches) as dashed horizontal lines.
    ghost_sizes: the x ticks.
    path: the PNG to write.
    ylabel: the y axis' label.
  """
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
  x = np.arange(len(ghost_sizes))
  for (title, panel), ax in zip(panels.items(), axes[0]):
    for index, (label, stats) in enumerate(panel['series'].items()):
      if any(s[2] for s in stats):
        ax.errorbar(x, [s[0] for s in stats], yerr=[s[1] for s in stats], marker='o', capsize=3, label=label,
                    color=f'C{index}')
    for label, (mean, color) in panel['lines'].items():
      ax.axhline(mean, color=color, linestyle='--', linewidth=1, label=label)
    ax.set_xticks(x, [str(g) for g in ghost_sizes])
    ax.set_xlabel(panel['xlabel'])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return _save(fig, path, STUDY_DPI)


def plot_precise_examples(curves: Mapping[str, Mapping[int, float]], moving: Mapping[str, float],
                          path: str | Path) -> Path:
  """Test accuracy with precise statistics against the examples they come from (`{model: {examples:
  accuracy}}`, log x), each model's moving-average accuracy (`{model: accuracy}`) a dashed line."""
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for index, label in enumerate(curves):
    ax.plot(list(curves[label]), list(curves[label].values()), 'o-', color=f'C{index}', label=f'{label}: precise')
    ax.axhline(moving[label], color=f'C{index}', linestyle='--', linewidth=1, label=f'{label}: EMA')
  ax.set_xscale('log')
  ax.set_xlabel('examples the precise statistics are computed from')
  ax.set_ylabel('test accuracy')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path, STUDY_DPI)
