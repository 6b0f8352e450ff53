"""Forward+backward time of bnjax.batch_norm / batch_renorm against flax.linen.BatchNorm.

Training mode, float32, on `[512, 256]` dense and `[128, 32, 32, 64]` NHWC
inputs. Every variant is timed in the same run, interleaved round by round, and
reported as the median over rounds; ratios are what to compare (this machine is
noisy, absolute times are not).

    python benchmarks/bench_norm.py [--rounds 15] [--inner 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import bnjax

SHAPES = {'dense [512, 256]': (512, 256), 'nhwc [128, 32, 32, 64]': (128, 32, 32, 64)}


def _loss_and_grad(apply):
  """jit(value_and_grad) of sum(y * w) w.r.t. (x, params); returns new state too."""

  def loss(x, params, state, w):
    y, new_state = apply(x, params, state)
    return jnp.sum(y * w), new_state

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def make_variants(num_features: int):
  params, state = bnjax.batch_norm_init(num_features)
  rparams, rstate = bnjax.batch_renorm_init(num_features)
  module = nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-3)
  fvars = module.init(jax.random.key(0), jnp.zeros((2, num_features)))

  def flax_apply(x, p, s):
    y, updates = module.apply({'params': p, 'batch_stats': s}, x, mutable=['batch_stats'])
    return y, updates['batch_stats']

  return {
      'flax.linen.BatchNorm': (_loss_and_grad(flax_apply), fvars['params'], fvars['batch_stats']),
      'bnjax.batch_norm': (
          _loss_and_grad(lambda x, p, s: bnjax.batch_norm(x, p, s, training=True)),
          params,
          state,
      ),
      'bnjax.batch_renorm': (
          _loss_and_grad(lambda x, p, s: bnjax.batch_renorm(x, p, s, training=True)),
          rparams,
          rstate,
      ),
  }


def time_call(fn, args, inner):
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(inner):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / inner


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=15)
  parser.add_argument('--inner', type=int, default=20)
  args = parser.parse_args()
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}; median of {args.rounds} rounds')
  for label, shape in SHAPES.items():
    key_x, key_w = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, shape) * 2.0 + 0.5
    w = jax.random.normal(key_w, shape)
    variants = make_variants(shape[-1])
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
      for name, (fn, params, state) in variants.items():
        times[name].append(time_call(fn, (x, params, state, w), args.inner))
    medians = {name: statistics.median(t) for name, t in times.items()}
    flax_time = medians['flax.linen.BatchNorm']
    print(f'\n{label}')
    for name, t in medians.items():
      print(f'  {name:24s} {t * 1e3:8.3f} ms   {t / flax_time:5.2f}x flax')
    print(f'  batch_renorm / batch_norm: {medians["bnjax.batch_renorm"] / medians["bnjax.batch_norm"]:.2f}x')


if __name__ == '__main__':
  main()
