"""Data-parallel training speed: examples/s of mnist_mlp with BN against the number of devices.

Each device count runs in its own subprocess (the number of forced CPU devices
is fixed when jax is imported): `--xla_force_host_platform_device_count=D` on
CPU, or the first D accelerators where there are some. The global batch is the
same for every count; rounds are interleaved across counts and the median is
reported (this machine is shared and noisy).

    python benchmarks/bench_parallel.py                       # 1, 2, 4, 8 devices, sync, batch 512
    python benchmarks/bench_parallel.py --mode local --rounds 5 --devices 1 8

On CPU the forced devices share the machine's cores: more devices than cores
cannot speed up; the figure measures the cost of the collectives.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(devices: int, mode: str, batch: int, steps: int, repeats: int) -> None:
  """In the subprocess: prints JSON `{'examples_per_second': [...], 'device': ...}`."""
  import jax
  import numpy as np

  from bnjax.lab import build, engine, parallel
  from bnjax.lab.config import TrainConfig

  config = TrainConfig(model='mnist_mlp', norm='bn', batch_size=batch, cross_device_stats=mode)
  rng = np.random.default_rng(0)
  images = rng.normal(0.5, 1.0, (batch * steps, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, batch * steps).astype(np.int32)
  model, optimizer = build.model(config), build.optimizer(config, steps)
  state = engine.init_train_state(model, optimizer, 0, images[:batch])
  if devices == 1:
    run = engine.make_train_steps(model, optimizer)
    data = jax.device_put((images, labels))
  else:
    mesh = parallel.make_mesh(devices)
    run = engine.make_data_parallel_train_steps(model, optimizer, mesh, batch_size=batch, cross_device_stats=mode)
    state, data = parallel.replicate((state, (images, labels)), mesh)
  train_steps = jax.jit(run, donate_argnums=0)
  batches = engine.epoch_batches(state, 0, images.shape[0], batch)
  state, metrics = train_steps(state, *data, batches)  # compile and warm up
  metrics.loss_sum.block_until_ready()
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = train_steps(state, *data, batches)
    metrics.loss_sum.block_until_ready()
    rates.append(batch * steps / (time.perf_counter() - start))
  print(json.dumps({'examples_per_second': rates, 'device': jax.devices()[0].device_kind}))


def measure(devices: int, args) -> tuple[list[float], str]:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  if env.get('JAX_PLATFORMS', 'cpu') == 'cpu' and not args.accelerator:
    env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  else:
    env['CUDA_VISIBLE_DEVICES'] = ','.join(str(i) for i in range(devices))
  command = [sys.executable, __file__, '--worker', str(devices), '--mode', args.mode, '--batch', str(args.batch),
             '--steps', str(args.steps), '--repeats', str(args.repeats)]
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  if result.returncode:
    raise RuntimeError(result.stderr[-2000:])
  out = json.loads(result.stdout.strip().splitlines()[-1])
  return out['examples_per_second'], out['device']


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--devices', type=int, nargs='+', default=[1, 2, 4, 8])
  parser.add_argument('--mode', choices=('sync', 'local'), default='sync')
  parser.add_argument('--batch', type=int, default=512, help='global batch')
  parser.add_argument('--steps', type=int, default=20, help='steps per timed scan')
  parser.add_argument('--repeats', type=int, default=3, help='timed scans per subprocess')
  parser.add_argument('--rounds', type=int, default=3, help='interleaved subprocesses per device count')
  parser.add_argument('--accelerator', action='store_true', help='use the first D GPUs instead of forced CPU devices')
  parser.add_argument('--worker', type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args.worker, args.mode, args.batch, args.steps, args.repeats)
    return
  rates = {d: [] for d in args.devices}
  device = '?'
  for _ in range(args.rounds):
    for d in args.devices:
      measured, device = measure(d, args)
      rates[d] += measured
  print(f'mnist_mlp + BN ({args.mode}), global batch {args.batch}, {args.steps} steps per scan, on {device}; '
        f'median of {args.rounds} x {args.repeats}')
  print(f'{"devices":>8s} {"examples/s":>12s} {"vs 1 device":>12s}')
  base = statistics.median(rates[args.devices[0]])
  for d in args.devices:
    median = statistics.median(rates[d])
    print(f'{d:8d} {median:12,.0f} {median / base:11.2f}x')


if __name__ == '__main__':
  main()
