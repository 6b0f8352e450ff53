"""Plots of training histories (matplotlib, written to PNG files; no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

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


def _save(fig, path: str | Path) -> Path:
  """Lays the figure out, writes it as a PNG (100 dpi) and closes it."""
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=100)
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
