"""Time of bnjax.lab.data.load on the real MNIST and CIFAR-10 in ../shared/data: median of rounds.

Each load reads the files (MNIST: gzipped IDX; CIFAR-10: the python pickles), splits, scales and
puts the arrays on the default device; `read` alone is timed too. The targets are MNIST well under
2 s and CIFAR-10 under 5 s. The first round includes the OS reading the files from disk.

    python benchmarks/bench_data.py [--rounds 3] [--data_dir ../shared/data]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax

from bnjax.lab import data

CASES = {
    'mnist (MNIST study: /255, test as validation)': ('mnist', {}),
    'cifar10 (CIFAR-10 study: standardize, 0.3 held out)': (
        'cifar10', {'scaling': 'standardize', 'validation': 0.3, 'validation_seed': 777}),
}


def seconds(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--data_dir', type=Path,
                      default=Path(__file__).resolve().parents[2] / 'shared' / 'data')
  args = parser.parse_args()
  jax.block_until_ready(jax.device_put(0))  # start the backend outside the timings
  print(f'data_dir {args.data_dir}, device {jax.devices()[0]}, median of {args.rounds}')
  for label, (name, kwargs) in CASES.items():
    read = [seconds(lambda: data.read(name, source='files', data_dir=args.data_dir).train_images)
            for _ in range(args.rounds)]
    load = [seconds(lambda: data.load(name, source='files', data_dir=args.data_dir, **kwargs))
            for _ in range(args.rounds)]
    print(f'{label}: read {statistics.median(read):.2f} s, load {statistics.median(load):.2f} s '
          f"(load rounds: {', '.join(f'{t:.2f}' for t in load)})")


if __name__ == '__main__':
  main()
