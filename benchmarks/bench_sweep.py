"""8 BN momentum values on real MNIST (mnist_mlp, batch 500, 1 epoch): one vmapped group vs 8 runs one after another.

    python benchmarks/bench_sweep.py [--rounds=3]

Sequential = the same engine path as a group of one (`sweep.train_group([config])`), its compiled
program reused across the 8 (same shapes; momentum is a traced value), and also `experiment.run`
x8 (compiles each run, as a user running train.py 8 times would). Compile time is counted in every
total (one compile for the vmapped group, one for the reused sequential path). Rounds interleave
the variants; medians are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from bnjax.lab import build, experiment, sweep  # noqa: E402
from bnjax.lab.config import TrainConfig  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data'
MOMENTA = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--epochs', type=int, default=1)
  args = parser.parse_args()
  base = TrainConfig(model='mnist_mlp', norm='bn', batch_size=500, epochs=args.epochs, data_dir=str(DATA),
                     progress_updates=1, checkpoint_every=0)
  configs, _ = sweep.expand_grid(base, {'momentum': MOMENTA})
  dataset = build.dataset(base, put=jax.device_put)
  quiet = lambda _: None
  settings = dataclasses.replace(sweep.GROUP_SETTINGS, log=quiet)

  def vmapped():
    return sweep.train_group(configs, dataset, settings, cache={})[0]

  def sequential():
    cache = {}
    return [sweep.train_group([c], dataset, settings, cache=cache)[0][0] for c in configs]

  def experiment_runs():
    return [experiment.run(c, dataset=dataset, progress=False, log=quiet) for c in configs]

  variants = {'vmapped group (K=8)': vmapped, 'sequential, 1 compile': sequential, 'experiment.run x8': experiment_runs}
  times = {name: [] for name in variants}
  results = {}
  for _ in range(args.rounds):
    for name, fn in variants.items():
      start = time.perf_counter()
      results[name] = fn()
      times[name].append(time.perf_counter() - start)
  print(f'{jax.devices()[0].device_kind}, {dataset.train_images.shape[0]} train examples, {args.epochs} epoch(s), '
        f'batch 500, median of {args.rounds} rounds (compile included):')
  vm = statistics.median(times['vmapped group (K=8)'])
  for name, values in times.items():
    median = statistics.median(values)
    print(f'  {name:24s} {median:7.2f} s   ratio vmapped/this {vm / median:.2f}')
  worst = max(abs(a['test_accuracy_moving_stats'] - b['test_accuracy_moving_stats'])
              for a, b in zip(results['vmapped group (K=8)'], results['experiment.run x8']))
  print(f'  max |test acc vmapped - experiment.run| over the 8 momenta: {worst:.4f}')


if __name__ == '__main__':
  main()
