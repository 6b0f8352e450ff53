"""A sweep's report: `results.csv` -> mean ± std over seeds, markdown tables, PNG plots, `report.md`.

    write_report('runs/sweeps/momentum/results.csv')

Only what the results contain is plotted: a heatmap over momentum x batch
size (inverse decay as its own column) when both vary, else a line over
momentum; bars of dropout placement x norm; validation-accuracy curves of
renorm vs BN at batch sizes <= 32.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from bnjax.lab.config import FIELDS  # noqa: E402
from bnjax.lab.options import OPTIONS, norm_kind  # noqa: E402

METRIC = 'test_accuracy_moving_stats'
SMALL_BATCH = 32


def _parse(text: str) -> Any:
  if text == '':
    return None
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return {'True': True, 'False': False}.get(text, text)


# The columns the report reads in every row (a results.csv that a sweep wrote has them all).
REQUIRED_COLUMNS = ('run_id', 'status', 'norm', 'batch_size', 'momentum', 'test_accuracy_moving_stats')


def read_results(path: str | Path) -> list[dict[str, Any]]:
  """Rows of results.csv with numbers parsed, empty cells as None, the curve as a list.

  Raises ValueError (one line) for a file that is not a sweep's results.csv.
  """
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f'{path} is not a sweep\'s results.csv (it lacks the columns {", ".join(missing)}): pass the '
                       'results.csv in a --sweep_dir that experiments/sweep.py wrote.')
    rows = [{k: _parse(v) for k, v in row.items()} for row in reader]
  for row in rows:
    curve = row.get('val_accuracy_curve')
    row['val_accuracy_curve'] = json.loads(curve) if isinstance(curve, str) else []
  return rows


def momentum_label(row: dict) -> str:
  """'0.9', or 'inverse_decay' for the schedule (its momentum is unused)."""
  return 'inverse_decay' if row.get('momentum_schedule') == 'inverse_decay' else f'{row["momentum"]:g}'


def has_moving_statistics(row: dict) -> bool:
  """Whether the row's norm kind keeps moving statistics (so its momentum is used)."""
  return norm_kind(row['norm']).moving_statistics


def varying_fields(rows: Sequence[dict]) -> list[str]:
  """The hyperparameters the sweep varies (seed included)."""
  return [f for f in FIELDS if len({str(r.get(f)) for r in rows}) > 1]


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
  """`(mean, std, n)` of the finite values (std with ddof=0; nan when none)."""
  finite = [v for v in values if v is not None and math.isfinite(v)]
  if not finite:
    return math.nan, math.nan, 0
  return float(np.mean(finite)), float(np.std(finite)), len(finite)


def aggregate(rows: Sequence[dict], by: Sequence[str], metric: str = METRIC) -> dict[tuple, tuple[float, float, int]]:
  """`{values of by: (mean, std, n)}` of `metric` over the rows (e.g. over seeds); 'momentum' means its label."""
  key = lambda r: tuple(momentum_label(r) if f == 'momentum' else r.get(f) for f in by)
  groups: dict[tuple, list] = {}
  for row in rows:
    groups.setdefault(key(row), []).append(row.get(metric))
  return {k: mean_std(v) for k, v in groups.items()}


def _cell(stats: tuple[float, float, int]) -> str:
  mean, std, n = stats
  return '-' if n == 0 else f'{mean:.4f} ± {std:.4f}'


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A markdown table (no trailing newline): the header, its rule, one line per row."""
  lines = ['| ' + ' | '.join(str(h) for h in header) + ' |', '|' + '---|' * len(header)]
  return '\n'.join(lines + ['| ' + ' | '.join(str(v) for v in row) + ' |' for row in rows])


def summary_table(rows: Sequence[dict]) -> str:
  """Markdown: one line per setting (seeds pooled): mean ± std of the main metrics, runs, statuses."""
  by = [f for f in varying_fields(rows) if f != 'seed'] or ['model']
  metrics = ('test_accuracy_moving_stats', 'test_accuracy_batch_stats', 'best_val_accuracy', 'train_val_gap')
  tables = {m: aggregate(rows, by, m) for m in metrics}
  statuses: dict[tuple, list] = {}
  for row in rows:
    statuses.setdefault(tuple(momentum_label(row) if f == 'momentum' else row.get(f) for f in by), []).append(row['status'])
  lines = []
  for key, status in statuses.items():
    counts = ', '.join(f'{status.count(s)} {s}' for s in sorted(set(status)))
    lines.append(list(key) + [_cell(tables[m][key]) for m in metrics] + [counts])
  return markdown_table(by + list(metrics) + ['runs'], lines)


def sorted_labels(labels) -> list:
  return sorted(labels, key=lambda v: (isinstance(v, str), v if not isinstance(v, str) else 0, str(v)))


def plot_heatmap(rows: Sequence[dict], path: Path, metric: str = METRIC, title: str = '') -> Path:
  """Mean `metric` over batch size (rows) x momentum (columns, inverse decay last), annotated mean ± std."""
  table = aggregate(rows, ['batch_size', 'momentum'], metric)
  batches = sorted({k[0] for k in table})
  momenta = sorted_labels({k[1] for k in table})
  grid = np.full((len(batches), len(momenta)), np.nan)
  fig, ax = plt.subplots(figsize=(1.3 * len(momenta) + 2, 0.8 * len(batches) + 1.5))
  for (b, m), (mean, std, n) in table.items():
    i, j = batches.index(b), momenta.index(m)
    grid[i, j] = mean
    if n:
      ax.text(j, i, f'{mean:.3f}\n±{std:.3f}', ha='center', va='center', fontsize=8)
  image = ax.imshow(grid, cmap='viridis', aspect='auto')
  ax.set_xticks(range(len(momenta)), momenta, rotation=30)
  ax.set_yticks(range(len(batches)), batches)
  ax.set_xlabel('BN momentum')
  ax.set_ylabel('batch size')
  ax.set_title(title or metric)
  fig.colorbar(image, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_lines(rows: Sequence[dict], x: str, path: Path, metric: str = METRIC, series: str | None = None) -> Path:
  """Mean ± std of `metric` over `x` (categorical), one line per value of `series`."""
  fig, ax = plt.subplots(figsize=(7, 4))
  by = [x] + ([series] if series else [])
  table = aggregate(rows, by, metric)
  labels = sorted_labels({k[0] for k in table})
  for name in sorted({k[1] for k in table}, key=str) if series else [None]:
    points = [(labels.index(k[0]), v) for k, v in table.items() if not series or k[1] == name]
    points.sort()
    ax.errorbar([p[0] for p in points], [p[1][0] for p in points], yerr=[p[1][1] for p in points],
                marker='o', capsize=3, label=f'{series}={name}' if series else None)
  ax.set_xticks(range(len(labels)), [str(v) for v in labels])
  ax.set_xlabel(x)
  ax.set_ylabel(metric)
  ax.grid(alpha=0.3)
  if series:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_bars(rows: Sequence[dict], path: Path, metric: str = METRIC) -> Path:
  """Mean ± std of `metric`: groups of bars by dropout placement, one bar per norm kind."""
  table = aggregate(rows, ['dropout_placement', 'norm'], metric)
  placements = [p for p in OPTIONS['dropout_placement'].allowed() if any(k[0] == p for k in table)]
  norms = sorted({k[1] for k in table})
  width = 0.8 / len(norms)
  fig, ax = plt.subplots(figsize=(8, 4))
  for j, norm in enumerate(norms):
    stats = [table.get((p, norm), (math.nan, 0.0, 0)) for p in placements]
    ax.bar(np.arange(len(placements)) + j * width, [s[0] for s in stats], width, yerr=[s[1] for s in stats],
           capsize=3, label=f'norm={norm}')
  ax.set_xticks(np.arange(len(placements)) + width * (len(norms) - 1) / 2, placements)
  ax.set_xlabel('dropout placement')
  ax.set_ylabel(metric)
  ax.legend()
  ax.grid(alpha=0.3, axis='y')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_curves_by_norm(rows: Sequence[dict], path: Path, max_batch: int = SMALL_BATCH) -> Path | None:
  """Validation accuracy per epoch (mean over seeds), one panel per batch size <= max_batch, a line per norm."""
  small = [r for r in rows if r['batch_size'] <= max_batch and r['val_accuracy_curve']]
  batches = sorted({r['batch_size'] for r in small})
  if not batches:
    return None
  fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 3.5), squeeze=False)
  for ax, batch in zip(axes[0], batches):
    for index, norm in enumerate(sorted({r['norm'] for r in small if r['batch_size'] == batch})):
      curves = [r['val_accuracy_curve'] for r in small if r['batch_size'] == batch and r['norm'] == norm]
      length = min(len(c) for c in curves)
      values = np.array([c[:length] for c in curves])
      epochs = np.arange(1, length + 1)
      ax.plot(epochs, values.mean(0), marker='o', color=f'C{index}', label=norm)
      ax.fill_between(epochs, values.mean(0) - values.std(0), values.mean(0) + values.std(0), color=f'C{index}', alpha=0.2)
    ax.set_title(f'batch {batch}')
    ax.set_xlabel('epoch')
    ax.set_ylabel('validation accuracy')
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_report(results_csv: str | Path, *, command: str = '', out_dir: str | Path | None = None,
                 log: Callable[[str], None] = print) -> Path:
  """`report.md` and its PNGs beside `results_csv` (or in `out_dir`); returns the report's path."""
  results_csv = Path(results_csv)
  out = Path(out_dir) if out_dir else results_csv.parent
  out.mkdir(parents=True, exist_ok=True)
  rows = read_results(results_csv)
  if not command and (results_csv.parent / 'sweep.json').exists():
    command = json.loads((results_csv.parent / 'sweep.json').read_text()).get('command', '')
  varying = varying_fields(rows)
  done = [r for r in rows if r['status'] == 'completed']
  lines = ['# Sweep report', '']
  if command:
    lines += ['Produced by:', '', f'    {command}', '']
  statuses = [r['status'] for r in rows]
  lines += [f'{len(rows)} runs ({", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses)))}); '
            f'varying: {", ".join(varying) or "nothing"}. Accuracies are mean ± std over seeds; test accuracy '
            'with the moving statistics unless named batch stats; train_val_gap = final train accuracy (batch '
            'statistics, running over the last epoch) - final validation accuracy.', '',
            summary_table(rows), '']
  moving = [r for r in done if has_moving_statistics(r)]
  momentum_varies = len({momentum_label(r) for r in moving}) > 1
  figures: list[tuple[str, Path | None, str]] = []
  if momentum_varies and 'batch_size' in varying:
    figures.append(('Test accuracy over momentum x batch size',
                    plot_heatmap(moving, out / 'heatmap_momentum_batch.png'), ''))
    gap = [r for r in moving if r.get('stats_gap') is not None]
    if gap:
      figures.append(('Batch-stats minus moving-stats test accuracy', plot_heatmap(
          gap, out / 'heatmap_stats_gap.png', 'stats_gap', 'test acc (batch stats) - test acc (moving stats)'), ''))
  elif momentum_varies:
    figures.append(('Test accuracy over momentum', plot_lines(done, 'momentum', out / 'momentum.png'), ''))
  elif 'batch_size' in varying and 'norm' not in varying:
    figures.append(('Test accuracy over batch size', plot_lines(done, 'batch_size', out / 'batch_size.png'), ''))
  if 'dropout_placement' in varying:
    figures.append(('Dropout placement x norm', plot_bars(done, out / 'dropout_norm.png'), ''))
  if 'norm' in varying and 'batch_size' in varying:
    figures.append(('Test accuracy over batch size, per norm', plot_lines(done, 'batch_size', out / 'batch_norm.png',
                                                                          series='norm'), ''))
    curves = plot_curves_by_norm(done, out / 'curves_small_batch.png')
    figures.append((f'Validation accuracy per epoch at batch sizes <= {SMALL_BATCH}', curves,
                    f'no completed run with batch size <= {SMALL_BATCH}'))
  for title, path, note in figures:
    lines += [f'## {title}', '']
    lines += [f'![{title}]({path.name})', ''] if path else [f'({note})', '']
  if not figures:
    lines += ['(no plot: the sweep varies none of momentum, batch size, dropout placement, norm)', '']
  errors = [r for r in rows if r['status'] == 'error']
  if errors:
    lines += ['## Errors', ''] + [f'- `{r["run_id"]}`: {r.get("error")}' for r in errors] + ['']
  path = out / 'report.md'
  path.write_text('\n'.join(lines))
  log(f'report: {path}')
  return path
