"""ResNet-20's training step on CPU: bnjax, the usual Flax recipe and PyTorch (#26).

Contenders, each training ResNet-20 (He et al. 2016, option-A shortcuts,
`bnjax.lab.resnet`) with SGD (momentum 0.9, weight decay 5e-4, lr 0.1) and
cross-entropy on the same synthetic CIFAR-shaped batches, timed in the same
process, alternating one contender after the other, median of rounds:
- bnjax: `resnet.ResNet` as it is (`bnjax.linen.BatchNorm`, `conv.Conv`:
  the kernel gradients of its stride-1 3x3 convolutions over 8-image
  slices), one jitted step per call, on one CPU device;
- bnjax data-parallel over the CPU devices (`--cpu_devices`, default one per
  core; BN synchronized with `axis_name`, one collective per BN layer);
- lever rows: bnjax with `flax.linen.Conv` (no kernel-gradient slices), and
  with the kernel gradients over 16- and 32-image slices, and with SGD over
  one flattened parameter vector (`optax.flatten`);
- the usual Flax recipe: the same network with `flax.linen.Conv`,
  `flax.linen.BatchNorm` and optax;
- PyTorch, if installed (a benchmark-only dependency): the same network,
  eager, channels-last, 2 threads (and 1 thread).

    python benchmarks/bench_resnet.py                    # batch 128 and 32
    python benchmarks/bench_resnet.py --batch 128 --rounds 7
    python benchmarks/bench_resnet.py --profile          # where one step's time goes, ours and PyTorch's

The allocator and `--cpu_devices` are as in `bench_conv.py` (process-wide,
set before JAX starts). Compare the printed ratios, not milliseconds: the
machine is shared, and the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bnjax.lab import host  # noqa: E402


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, nargs='+', default=[128, 32])
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=None, help='steps per timing (default: 256 / batch, at least 1)')
  parser.add_argument('--depth', type=int, default=20, help='ResNet depth, 6n + 2 (20, 32, 56)')
  parser.add_argument('--profile', action='store_true', help='print where one step goes instead of timing')
  parser.add_argument('--no_levers', action='store_true', help='leave out the lever rows')
  parser.add_argument('--allocator', choices=('retain', 'glibc'), default='retain')
  parser.add_argument('--cpu_devices', default=host.AUTO, help="as bench_conv.py's (default 'auto': one per core)")
  return parser


ARGS = _parser().parse_args() if __name__ == '__main__' else None
import bench_conv  # noqa: E402  (imports jax, but starts no backend)

ALLOCATOR = bench_conv._early_setup(ARGS) if ARGS is not None else 'glibc'

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from bnjax.lab import conv as conv_lib  # noqa: E402
from bnjax.lab import parallel, resnet  # noqa: E402

LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
NUM_EXAMPLES = 2048
AXIS = parallel.AXIS


def optimizer():
  return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))


@contextlib.contextmanager
def kernel_grad_chunk(size):
  """Trace `conv.Conv` with its kernel gradient over `size`-image slices (the default is `conv.KERNEL_GRAD_CHUNK`)."""
  original = conv_lib.KERNEL_GRAD_CHUNK
  conv_lib.KERNEL_GRAD_CHUNK = size or original
  try:
    yield
  finally:
    conv_lib.KERNEL_GRAD_CHUNK = original


def jax_contender(model, images, labels, batch, mesh=None, chunk=None, tx=None):
  """`run(steps)`: one jitted SGD step per call (state donated); `run.compiled_text` its HLO.

  With a `mesh`, the step runs data-parallel under `shard_map`: each device
  takes its slice of the batch, BN synchronizes over `AXIS` (the model's
  norm must say so), and the replicated parameters' gradients are summed.
  """
  tx = tx or optimizer()
  variables = model.init(jax.random.key(0), images[:1])
  state = (variables['params'], variables['batch_stats'], tx.init(variables['params']))
  local = batch if mesh is None else batch // mesh.size

  def step(state, images, labels, start):
    params, stats, opt_state = state
    if mesh is not None:
      start = start + jax.lax.axis_index(AXIS) * local
    x = jax.lax.dynamic_slice_in_dim(images, start, local)
    y = jax.lax.dynamic_slice_in_dim(labels, start, local)

    def loss_fn(params):
      if mesh is not None:
        params = jax.lax.pcast(params, AXIS, to='varying')  # its transpose sums the gradients over devices
      logits, updates = model.apply({'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum() / batch, updates['batch_stats']

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if mesh is not None:
      loss = jax.lax.psum(loss, AXIS)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), stats, opt_state), loss

  if mesh is not None:
    step = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(), P()), out_specs=(P(), P()))
    state, images, labels = parallel.replicate((state, images, labels), mesh)
  with kernel_grad_chunk(chunk):
    compiled = jax.jit(step, donate_argnums=0).lower(state, images, labels, jnp.int32(0)).compile()
  holder, counter = [state], [0]
  starts = [jnp.int32(i * batch) for i in range(images.shape[0] // batch)]

  def run(steps):
    for _ in range(steps):
      holder[0], loss = compiled(holder[0], images, labels, starts[counter[0] % len(starts)])
      counter[0] += 1
    jax.block_until_ready(loss)

  run(1)
  run.compiled_text = compiled.as_text()
  return run


def torch_contender(batch, depth=20, threads=2, seed=0):
  """`run(steps)`: PyTorch's eager training step of the same ResNet (channels-last); None without torch."""
  try:
    import torch
  except ImportError:
    return None
  tnn, functional = torch.nn, torch.nn.functional
  torch.manual_seed(seed)
  default_threads = torch.get_num_threads()

  class Block(tnn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv_0 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.norm_0 = tnn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
      self.conv_1 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.norm_1 = tnn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
      self.stride, self.extra = stride, cout - cin

    def forward(self, x):
      y = functional.relu(self.norm_0(self.conv_0(x)))
      y = self.norm_1(self.conv_1(y))
      shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
      if self.extra:
        shortcut = functional.pad(shortcut, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
      return functional.relu(y + shortcut)

  n = resnet.blocks_per_stage(depth)
  layers, cin = [tnn.Conv2d(3, 16, 3, 1, 1, bias=False), tnn.BatchNorm2d(16, momentum=0.1, eps=1e-5), tnn.ReLU()], 16
  for stage, channels in enumerate(resnet.STAGE_CHANNELS):
    for block in range(n):
      layers.append(Block(cin, channels, 2 if stage > 0 and block == 0 else 1))
      cin = channels
  layers += [tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(64, 10)]
  net = tnn.Sequential(*layers)
  for module in net.modules():
    if isinstance(module, tnn.Conv2d):
      tnn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
  net = net.to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  generator = torch.Generator().manual_seed(seed)
  images = torch.randn(NUM_EXAMPLES, 3, 32, 32, generator=generator).to(memory_format=torch.channels_last)
  labels = torch.randint(0, 10, (NUM_EXAMPLES,), generator=generator)

  def run(steps):
    torch.set_num_threads(threads)
    for i in range(steps):
      start = (i * batch) % (NUM_EXAMPLES - batch + 1)
      opt.zero_grad(set_to_none=True)
      loss = functional.cross_entropy(net(images[start : start + batch]), labels[start : start + batch])
      loss.backward()
      opt.step()
    loss.item()
    torch.set_num_threads(default_threads)

  run(2)  # warm up
  run.torch = torch
  return run


def contenders(batch, depth=20, levers=True):
  images, labels = bench_conv.synthetic_cifar(NUM_EXAMPLES)
  found = {}
  run = torch_contender(batch, depth)
  if run is None:
    print('  (PyTorch is not installed: its rows are skipped; `pip install torch` to compare)')
  else:
    found['pytorch (eager, channels-last, 2 threads)'] = run
    found['pytorch (eager, channels-last, 1 thread)'] = torch_contender(batch, depth, threads=1)
  found['bnjax (resnet.ResNet, conv.Conv)'] = jax_contender(resnet.ResNet(depth=depth), images, labels, batch)
  devices = jax.device_count()
  if devices > 1 and batch % devices == 0:
    norm = functools.partial(resnet.default_norm, axis_name=AXIS)
    found[f'bnjax, data-parallel over {devices} CPU devices'] = jax_contender(
        resnet.ResNet(depth=depth, norm=norm), images, labels, batch, mesh=parallel.make_mesh())
  if levers:
    found['lever off: bnjax with nn.Conv'] = jax_contender(resnet.ResNet(depth=depth, conv=nn.Conv), images, labels, batch)
    for chunk in (16, 32):
      if chunk < batch:
        found[f'lever: kernel gradients over {chunk}-image slices'] = jax_contender(
            resnet.ResNet(depth=depth), images, labels, batch, chunk=chunk)
    found['lever: SGD over one flattened vector (optax.flatten)'] = jax_contender(
        resnet.ResNet(depth=depth), images, labels, batch, tx=optax.flatten(optimizer()))
  flax_norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
  found['flax recipe (nn.Conv, nn.BatchNorm)'] = jax_contender(
      resnet.ResNet(depth=depth, norm=flax_norm, conv=nn.Conv), images, labels, batch)
  return found


def compare(batch, rounds, steps, depth=20, levers=True):
  found = contenders(batch, depth, levers)
  times = bench_conv.alternate(found, rounds, steps)
  medians = {name: statistics.median(t) for name, t in times.items()}
  torch_rows = [name for name in found if name.startswith('pytorch')]
  base = medians[torch_rows[0]] if torch_rows else None
  ours = medians['bnjax (resnet.ResNet, conv.Conv)']
  print(f'\nResNet-{depth} training step, batch {batch}: median of {rounds} rounds of {steps} steps '
        f'(load average {", ".join(f"{v:.1f}" for v in os.getloadavg())})')
  for name, t in times.items():
    ratio = f'   {medians[name] / base:5.2f}x pytorch' if base else ''
    print(f'  {name:50s} {medians[name] * 1e3:8.1f} ms/step  (quartiles '
          f'{bench_conv._quantile(t, 0.25) * 1e3:.0f}-{bench_conv._quantile(t, 0.75) * 1e3:.0f})'
          f'{ratio}   {medians[name] / ours:5.2f}x bnjax')
  return medians


# ----------------------------------------------------------------------------
# Profiles: where one training step's time goes.

CATEGORIES = ('conv forward', 'conv backward-data', 'conv backward-filter', 'conv backward (data + filter)',
              'batch norm', 'relu', 'shortcuts (residual add, subsample, pad)', 'pooling', 'dense + loss',
              'optimizer (sgd)', 'other')


def _resnet_category(name, instructions, users, depth=0):
  """A thunk's category from its HLO metadata: the jax op and the Flax module (resnet's names) that made it."""
  if name not in instructions:
    return 'other'
  shape, opcode, op_name, _ = instructions[name]
  backward = 'transpose(' in op_name
  category = 'other'
  block = re.search(r'_block\d+/(.*)', op_name)
  if re.search(r'/conv_\d+/', op_name):
    if not backward:
      category = 'conv forward'
    elif re.search(r'\[\d+,3,3,\d+\]|\[3,3,\d+,\d+\]', shape):  # a kernel ([F, 3, 3, C] slices or [3, 3, C, F])
      category = 'conv backward-filter'
    else:
      category = 'conv backward-data'
  elif '/norm_' in op_name:
    category = 'batch norm'
  elif 'relu' in op_name or re.search(r'(ResNet\)+|_block\d+)/(select_n|max|gt)\b', op_name):
    category = 'relu'
  elif block:
    category = 'shortcuts (residual add, subsample, pad)'
  elif re.search(r'ResNet\)?\)?/(reduce_sum|div|broadcast_in_dim|mean)', op_name):
    category = 'pooling'
  elif '/head/' in op_name or 'jvp(' in op_name or 'transpose(' in op_name:
    category = 'dense + loss'
  elif op_name.startswith('jit('):
    category = 'optimizer (sgd)'  # and the step's bookkeeping
  if category == 'other' and depth < 4:
    for user in users.get(name, ()):
      category = _resnet_category(user, instructions, users, depth + 1)
      if category != 'other':
        break
  return category


_TORCH_CATEGORIES = (
    ('Optimizer.', 'optimizer (sgd)'), ('ConvolutionBackward', 'conv backward (data + filter)'),
    ('convolution_backward', 'conv backward (data + filter)'), ('convolution', 'conv forward'),
    ('BatchNorm', 'batch norm'), ('batch_norm', 'batch norm'),
    ('Relu', 'relu'), ('relu', 'relu'), ('threshold_backward', 'relu'),
    ('AddBackward', 'shortcuts (residual add, subsample, pad)'), ('aten::add', 'shortcuts (residual add, subsample, pad)'),
    ('ConstantPadNd', 'shortcuts (residual add, subsample, pad)'), ('constant_pad', 'shortcuts (residual add, subsample, pad)'),
    ('SliceBackward', 'shortcuts (residual add, subsample, pad)'), ('aten::slice', 'shortcuts (residual add, subsample, pad)'),
    ('adaptive_avg_pool', 'pooling'), ('AdaptiveAvgPool', 'pooling'), ('MeanBackward', 'pooling'),
    ('Addmm', 'dense + loss'), ('addmm', 'dense + loss'), ('aten::mm', 'dense + loss'),
    ('softmax', 'dense + loss'), ('nll_loss', 'dense + loss'), ('cross_entropy', 'dense + loss'),
)


def profile(batch, steps, depth=20):
  images, labels = bench_conv.synthetic_cifar(NUM_EXAMPLES)
  columns = {}
  rows = {'bnjax, 1 device': (resnet.ResNet(depth=depth), None)}
  if jax.device_count() > 1 and batch % jax.device_count() == 0:
    norm = functools.partial(resnet.default_norm, axis_name=AXIS)
    rows[f'bnjax over {jax.device_count()} CPU devices'] = (resnet.ResNet(depth=depth, norm=norm), parallel.make_mesh())
  for title, (model, mesh) in rows.items():
    run = jax_contender(model, images, labels, batch, mesh=mesh)
    columns[title] = bench_conv.profile_jax(lambda run=run: run(1), run.compiled_text, steps, _resnet_category)
  run = torch_contender(batch, depth)
  if run is not None:
    columns['pytorch (2 threads)'] = bench_conv.profile_torch(run, steps, _TORCH_CATEGORIES)
  bench_conv.print_profile(
      f'Where one ResNet-{depth} training step goes, batch {batch}, ms per step (mean of {steps} steps, '
      f'load average {os.getloadavg()[0]:.1f}); allocator: {ALLOCATOR}', columns, CATEGORIES, 42, 26)


def main():
  args = ARGS
  print(f'jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}, {os.cpu_count()} cores; '
        f'allocator: {ALLOCATOR}; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  for batch in args.batch:
    steps = args.steps or max(1, 256 // batch)
    if args.profile:
      profile(batch, max(steps, 3), args.depth)
    else:
      compare(batch, args.rounds, steps, args.depth, not args.no_levers)


if __name__ == '__main__':
  main()
