"""One sweep on 1 vs 8 (forced) CPU devices: the same results, and what spreading the lanes costs or gains.

    python benchmarks/bench_sweep_devices.py [--rounds=3] [--devices=8] [--epochs=1]

The sweep: 8 BN momentum values of the MNIST MLP (real MNIST from ../shared/data, batch 500), one
vmapped group. With D devices its 8 lanes are sharded over them along the `runs` mesh axis
(`bnjax.lab.programs.lanes`), each device training 8/D runs. XLA's forced host devices
(`--xla_force_host_platform_device_count`) must be set before JAX starts, so every measurement is a
fresh process; rounds alternate 1 and D devices and the medians are printed, with their ratio and
the largest difference between the two sweeps' accuracies. On a CPU the forced devices share the
same cores, so no speed-up is expected there: the ratio is the overhead of the sharding (or the gain
of running the lanes' programs side by side). On a host with D accelerators the same code gives
each its share of the lanes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data'
MOMENTA = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99]


def measure(epochs: int) -> dict:
  """In a fresh process with the devices XLA_FLAGS asked for: the sweep's wall time and accuracies."""
  import time

  import jax

  from bnjax.lab import config as config_lib
  from bnjax.lab import sweep

  base = config_lib.make(dict(model='mnist_mlp', norm='bn', batch_size=500, epochs=epochs, data_dir=str(DATA),
                              progress_updates=1))
  configs, _ = sweep.expand_grid(base, {'momentum': MOMENTA})
  with tempfile.TemporaryDirectory() as folder:
    start = time.perf_counter()
    records = sweep.run_sweep(configs, folder, report=False, log=lambda message: None)
    seconds = time.perf_counter() - start
  return {'devices': jax.local_device_count(), 'seconds': seconds,
          'train_seconds': [r['train_seconds'] for r in records],  # each lane's: the group's epochs
          'compile_seconds': records[0]['compile_seconds'],
          'accuracy': [r['test_accuracy_moving_stats'] for r in records],
          'batch_accuracy': [r['test_accuracy_batch_stats'] for r in records]}


def run_once(devices: int, epochs: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  result = subprocess.run([sys.executable, __file__, '--measure', f'--epochs={epochs}'], capture_output=True,
                          text=True, env=env, check=False)
  if result.returncode:
    sys.exit(f'the {devices}-device run failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--epochs', type=int, default=1)
  parser.add_argument('--measure', action='store_true', help='(internal) one measurement in this process')
  args = parser.parse_args()
  if args.measure:
    print(json.dumps(measure(args.epochs)))
    return
  if not (DATA / 'mnist').is_dir():
    sys.exit(f'the real MNIST is not at {DATA / "mnist"} (see ../shared/data/README.md)')
  runs = {1: [], args.devices: []}
  for round_index in range(args.rounds):
    for devices in (1, args.devices) if round_index % 2 == 0 else (args.devices, 1):
      runs[devices].append(run_once(devices, args.epochs))
      last = runs[devices][-1]
      print(f'round {round_index + 1}: {devices} device(s): sweep {last["seconds"]:.1f} s '
            f'(training the group {statistics.median(last["train_seconds"]):.1f} s, compile '
            f'{last["compile_seconds"]:.1f} s)', flush=True)
  print(f'{os.cpu_count()} CPU cores; 8 momenta x MNIST MLP, batch 500, {args.epochs} epoch(s), one vmapped group; '
        f'medians of {args.rounds} rounds:')
  median = {d: statistics.median(r['seconds'] for r in rs) for d, rs in runs.items()}
  for devices, seconds in median.items():
    print(f'  {devices} device(s): {seconds:.1f} s for the whole sweep')
  print(f'  ratio {args.devices} / 1 devices: {median[args.devices] / median[1]:.2f}x the time')
  for key in ('accuracy', 'batch_accuracy'):
    difference = max(abs(a - b) for one, many in zip(runs[1], runs[args.devices])
                     for a, b in zip(one[key], many[key]))
    print(f'  largest |difference| of test {key.replace("_", " ")} between the two: {difference:.4f}')


if __name__ == '__main__':
  main()
