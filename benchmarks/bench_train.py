"""Training speed: bnjax's engine against the usual Flax recipe, on the real data in ../shared/data.

The Flax recipe: flax.linen with nn.BatchNorm, a jitted train step, and a
Python loop over the batches of an epoch, each indexed from device arrays.
bnjax: the same model from `bnjax.lab.models`, one jitted `lax.scan` per epoch
over device-shuffled batches (`bnjax.lab.engine`). Both use Adam and the same
batch; every variant is timed in the same run, interleaved, median of rounds.

    python benchmarks/bench_train.py                    # MNIST epoch + BN overhead + CIFAR steps
    python benchmarks/bench_train.py --only mnist --rounds 5

Figures to compare are the ratios (this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import flax.linen as nn
import jax
import optax

from bnjax.lab import data as data_lib
from bnjax.lab import engine, models

DATA_DIR = Path(__file__).resolve().parents[2] / 'shared' / 'data'


class FlaxMLP(nn.Module):
  """The source's MNIST MLP, written the usual Flax way."""

  use_bn: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.reshape(x.shape[0], -1)
    for width in (256, 128, 512, 64, 128, 256):
      x = nn.Dense(width)(x)
      if self.use_bn:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3)(x)
      x = nn.relu(x)
    return nn.Dense(10)(x)


class FlaxCNN(nn.Module):
  """The source's CIFAR-10 CNN, written the usual Flax way."""

  @nn.compact
  def __call__(self, x, train: bool):
    for channels in (32, 64, 128):
      for _ in range(2):
        x = nn.Conv(channels, (3, 3), padding='SAME')(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3)(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3)(nn.Dense(256)(x)))
    return nn.Dense(10)(x)


def flax_recipe(module, images, labels, batch_size, lr):
  """`run_epoch(steps)`: the usual Flax loop; returns a function that trains `steps` batches."""
  variables = module.init(jax.random.key(0), images[:1], train=False)
  tx = optax.adam(lr)
  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
      logits, updates = module.apply(
          {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats']
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  state = [params, batch_stats, opt_state]
  perm = jax.random.permutation(jax.random.key(1), images.shape[0])

  def run(steps):
    for i in range(steps):
      idx = perm[i * batch_size : (i + 1) * batch_size]
      state[0], state[1], state[2], loss = train_step(state[0], state[1], state[2], images[idx], labels[idx])
    jax.block_until_ready(loss)

  return run


def bnjax_engine(model, images, labels, batch_size, lr):
  """`run(steps)`: bnjax's engine as `bnjax.lab.experiment` drives it: one scan of all the steps, or
  (conv models on CPU, see `engine.step_loop_for`) one jitted step per call."""
  tx = optax.adam(lr)
  state = engine.init_train_state(model, tx, 0, images[:1])
  python_loop = engine.step_loop_for(model) == 'python'
  run_steps = jax.jit(engine.make_train_steps(model, tx, unroll=python_loop), donate_argnums=0)
  holder = [state]
  compiled = {}

  def call(batches):
    if batches.shape[0] not in compiled:
      compiled[batches.shape[0]] = run_steps.lower(holder[0], images, labels, batches).compile()
    holder[0], metrics = compiled[batches.shape[0]](holder[0], images, labels, batches)
    return metrics

  def run(steps):
    batches = engine.epoch_batches(holder[0], 0, images.shape[0], batch_size)[:steps]
    if python_loop:
      for i in range(steps):
        metrics = call(batches[i : i + 1])
    else:
      metrics = call(batches)
    jax.block_until_ready(metrics)

  return run


def timed(fn, steps):
  start = time.perf_counter()
  fn(steps)
  return time.perf_counter() - start


def compare(title, variants, steps, rounds, baseline, per_step=False):
  for fn in variants.values():
    fn(steps)  # compile and warm up
  times = {name: [] for name in variants}
  for _ in range(rounds):
    for name, fn in variants.items():
      times[name].append(timed(fn, steps))
  print(f'\n{title}')
  base = statistics.median(times[baseline])
  for name, t in times.items():
    median = statistics.median(t)
    figure = f'{median / steps * 1e3:8.1f} ms/step' if per_step else f'{median:7.3f} s'
    print(f'  {name:34s} {figure}   {median / base:5.2f}x {baseline}')
  return {name: statistics.median(t) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--only', choices=('mnist', 'cifar'), default=None)
  parser.add_argument('--cifar_steps', type=int, default=20)
  parser.add_argument('--data_dir', default=str(DATA_DIR))
  args = parser.parse_args()
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}, {jax.device_count()} device(s); median of {args.rounds} rounds')

  if args.only in (None, 'mnist'):
    ds = data_lib.load('mnist', source='files', data_dir=args.data_dir, put=jax.device_put)
    x, y = ds.train_images, ds.train_labels
    steps = x.shape[0] // 500
    times = compare(
        f'MNIST mnist_mlp, batch 500, one epoch ({steps} steps)',
        {
            'flax recipe (nn.BatchNorm, loop)': flax_recipe(FlaxMLP(use_bn=True), x, y, 500, 1e-3),
            'bnjax bn (scan)': bnjax_engine(models.get('mnist_mlp', norm='bn'), x, y, 500, 1e-3),
            'bnjax plain (scan)': bnjax_engine(models.get('mnist_mlp', norm='none'), x, y, 500, 1e-3),
        },
        steps,
        args.rounds,
        baseline='flax recipe (nn.BatchNorm, loop)',
    )
    print(f'  BN overhead: bnjax bn / bnjax plain = {times["bnjax bn (scan)"] / times["bnjax plain (scan)"]:.2f}x')

  if args.only in (None, 'cifar'):
    ds = data_lib.load('cifar10', source='files', data_dir=args.data_dir, scaling='standardize', put=jax.device_put)
    x, y = ds.train_images[:10240], ds.train_labels[:10240]
    for batch in (32, 256):
      variants = {
          'flax recipe (nn.BatchNorm, loop)': flax_recipe(FlaxCNN(), x, y, batch, 1e-4),
          'bnjax bn (scan)': bnjax_engine(models.get('cifar_cnn', norm='bn'), x, y, batch, 1e-4),
      }
      conv_options = models.option_names('cifar_cnn')
      if 'conv_impl' in conv_options:
        variants['bnjax bn, cpu_fast convs (scan)'] = bnjax_engine(
            models.get('cifar_cnn', norm='bn', conv_impl='cpu_fast'), x, y, batch, 1e-4
        )
      compare(
          f'CIFAR-10 cifar_cnn, batch {batch}, {args.cifar_steps} steps',
          variants,
          args.cifar_steps,
          args.rounds,
          baseline='flax recipe (nn.BatchNorm, loop)',
          per_step=True,
      )


if __name__ == '__main__':
  main()
