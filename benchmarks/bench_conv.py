"""The CIFAR-10 CNN's training step on CPU: bnjax's engine, the usual Flax recipe and PyTorch (#17).

Contenders, each training `cifar_cnn` (Conv3x3-BN-ReLU blocks of 32, 64, 128
channels, max pools, Dense 256-BN-ReLU, Dense 10) with Adam at the same batch
size on the same synthetic batches, timed in the same process, alternating one
contender after the other, median of rounds:
- bnjax's engine as `bnjax.lab.experiment` drives it on CPU (one jitted step
  per call) with the model as it is (`bnjax.lab.conv` layers), and with the
  model as it was before #17 (`flax.linen.Conv`, `nn.max_pool`), and with
  only `conv.Conv`;
- the usual Flax recipe (`benchmarks/bench_train.py`: nn.Conv, nn.BatchNorm,
  nn.max_pool, a jitted train step);
- PyTorch, if installed (it is no dependency of bnjax): channels-last,
  torch.nn Conv2d + BatchNorm2d, torch.optim.Adam, eager
  (`--torch_compile` adds a torch.compile row).

    python benchmarks/bench_conv.py                     # batch 32 and 256
    python benchmarks/bench_conv.py --batch 32 --rounds 21
    python benchmarks/bench_conv.py --profile           # where one step's time goes, ours and PyTorch's

Host memory: XLA:CPU allocates a step's temporaries (70 MB at batch 32) as one
block per call; glibc serves a block that large with a fresh mmap, so every
step page-faults it in again (~40 ms of kernel time per step at batch 32).
`--allocator retain` (the default here) tells glibc, before JAX starts its
threads, to keep freed memory for reuse (`bnjax.lab.host.retain_freed_memory`, which the
CLIs apply too: `--host_allocator`);
`--allocator glibc` leaves glibc's defaults. The setting holds for the whole
process, PyTorch included. The figures to compare are the ratios printed
(this machine is shared and noisy); `os.getloadavg()` is printed beside them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

from bnjax.lab import host


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, nargs='+', default=[32, 256])
  parser.add_argument('--rounds', type=int, default=11)
  parser.add_argument('--steps', type=int, default=None, help='steps per timing (default: 4 at batch 32, 1 at 256)')
  parser.add_argument('--torch_compile', action='store_true', help='add a torch.compile row')
  parser.add_argument('--profile', action='store_true', help='print where one step goes instead of timing')
  parser.add_argument('--allocator', choices=('retain', 'glibc'), default='retain')
  parser.add_argument('--cpu_devices', default=host.AUTO,
                      help="the CPU as this many JAX devices (the CLIs' --cpu_devices; default 'auto': one per core) "
                           'for the data-parallel row; the other bnjax rows run on the first device')
  return parser


def _early_setup(args) -> str:
  """What must happen before JAX starts: the allocator, the CPU devices, and the profiler's per-thunk events."""
  allocator = 'glibc'
  if args.allocator == 'retain':
    allocator = 'retain' if host.retain_freed_memory() else 'glibc (mallopt failed)'
  if args.profile:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_enable_xprof_traceme=true').strip()
  try:
    host.split_cpu(args.cpu_devices)
  except ValueError as error:
    sys.exit(f'error: {error}')
  return allocator


ARGS = _parser().parse_args() if __name__ == '__main__' else None
ALLOCATOR = _early_setup(ARGS) if ARGS is not None else 'glibc'

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

from bnjax.lab import engine, models, parallel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import FlaxCNN, bnjax_engine, flax_recipe  # noqa: E402

LR = 1e-4
NUM_EXAMPLES = 4096


def synthetic_cifar(num=NUM_EXAMPLES, seed=0):
  """Standardized-looking `[num, 32, 32, 3]` images and labels (speed does not depend on the pixels)."""
  images = jax.random.normal(jax.random.key(seed), (num, 32, 32, 3))
  labels = jax.random.randint(jax.random.key(seed + 1), (num,), 0, 10)
  return images, labels


@contextlib.contextmanager
def layers_before_17(conv=True, pool=True):
  """Build and trace `models.Net` with the layers it had before #17 (flax's Conv and/or max_pool)."""
  original = models.conv_lib
  models.conv_lib = types.SimpleNamespace(
      Conv=nn.Conv if conv else original.Conv,
      max_pool=(lambda x, size: nn.max_pool(x, (size, size), strides=(size, size))) if pool else original.max_pool,
  )
  try:
    yield
  finally:
    models.conv_lib = original


def engine_contender(images, labels, batch, conv=False, pool=False):
  """bnjax's engine on cifar_cnn; `conv`/`pool`: use the pre-#17 layer (the step is compiled here)."""
  with layers_before_17(conv, pool):
    run = bnjax_engine(models.get('cifar_cnn', norm='bn', conv_impl='cpu_fast'), images, labels, batch, LR)
    run(1)
  return run


def data_parallel_contender(images, labels, batch):
  """bnjax's engine as the CLIs run it with `--cpu_devices`: data-parallel over every CPU device, BN synchronized."""
  step, text = _engine_step(models.get('cifar_cnn', norm='bn', conv_impl='cpu_fast'), images, labels, batch,
                            parallel.make_mesh())

  def run(count):
    for _ in range(count):
      metrics = step()
    jax.block_until_ready(metrics)

  run(1)
  run.compiled_text = text
  return run


def torch_contender(batch, compile_model=False, threads=None, seed=0):
  """`run(steps)`: PyTorch's eager (or torch.compile'd) training step of the same CNN; None without torch.

  `threads`: PyTorch's intra-op threads while this contender runs (default: PyTorch's, one per core).
  """
  try:
    import torch
  except ImportError:
    return None
  tnn = torch.nn
  torch.manual_seed(seed)
  default_threads = torch.get_num_threads()

  def block(cin, cout):
    # momentum 0.01 is Keras's (and bnjax's) 0.99; epsilon 1e-3 as Keras.
    return [tnn.Conv2d(cin, cout, 3, padding=1), tnn.BatchNorm2d(cout, momentum=0.01, eps=1e-3), tnn.ReLU()]

  layers, cin = [], 3
  for channels in (32, 64, 128):
    layers += block(cin, channels) + block(channels, channels) + [tnn.MaxPool2d(2)]
    cin = channels
  layers += [tnn.Flatten(), tnn.Linear(128 * 4 * 4, 256), tnn.BatchNorm1d(256, momentum=0.01, eps=1e-3), tnn.ReLU(),
             tnn.Linear(256, 10)]
  net = tnn.Sequential(*layers).to(memory_format=torch.channels_last)
  optimizer = torch.optim.Adam(net.parameters(), LR)
  forward = torch.compile(net) if compile_model else net
  generator = torch.Generator().manual_seed(seed)
  images = torch.randn(NUM_EXAMPLES, 3, 32, 32, generator=generator).to(memory_format=torch.channels_last)
  labels = torch.randint(0, 10, (NUM_EXAMPLES,), generator=generator)

  def step(i):
    start = (i * batch) % (NUM_EXAMPLES - batch + 1)
    x, y = images[start : start + batch], labels[start : start + batch]
    optimizer.zero_grad(set_to_none=True)
    loss = tnn.functional.cross_entropy(forward(x), y)
    loss.backward()
    optimizer.step()
    return loss

  def run(steps):
    torch.set_num_threads(threads or default_threads)
    for i in range(steps):
      loss = step(i)
    loss.item()
    torch.set_num_threads(default_threads)

  run(2)  # warm up (and compile)
  run.torch = torch
  run.step = step
  return run


def contenders(batch, torch_compile=False):
  images, labels = synthetic_cifar()
  found = {}
  runner = torch_contender(batch)
  if runner is None:
    print('  (PyTorch is not installed: its rows are skipped; `pip install torch` to compare)')
  else:
    found['pytorch (eager, channels-last)'] = runner
    # Under load (other processes on the cores) PyTorch's threads wait on each other; one thread does not.
    found['pytorch (eager, channels-last, 1 thread)'] = torch_contender(batch, threads=1)
    if torch_compile:
      found['pytorch (torch.compile)'] = torch_contender(batch, compile_model=True)
  found['bnjax engine, before #17 (nn.Conv, nn.max_pool)'] = engine_contender(images, labels, batch, conv=True, pool=True)
  found['bnjax engine, conv.Conv + nn.max_pool'] = engine_contender(images, labels, batch, pool=True)
  found['bnjax engine (conv.Conv, conv.max_pool)'] = engine_contender(images, labels, batch)
  if jax.device_count() > 1 and batch % jax.device_count() == 0:
    found[f'bnjax engine, data-parallel over {jax.device_count()} CPU devices'] = data_parallel_contender(
        images, labels, batch)
  recipe = flax_recipe(FlaxCNN(), images, labels, batch, LR)
  recipe(1)
  found['flax recipe (nn.Conv, nn.BatchNorm)'] = recipe
  return found


def alternate(found, rounds, steps):
  """`{name: [seconds per step, one per round]}`: each round runs every contender `run(steps)` in turn."""
  times = {name: [] for name in found}
  for _ in range(rounds):
    for name, run in found.items():
      start = time.perf_counter()
      run(steps)
      times[name].append((time.perf_counter() - start) / steps)
  return times


def compare(batch, rounds, steps, torch_compile=False):
  found = contenders(batch, torch_compile)
  times = alternate(found, rounds, steps)
  baseline = next((name for name in found if name.startswith('pytorch')), None)
  print(f'\ncifar_cnn training step, batch {batch}: median of {rounds} rounds of {steps} steps '
        f'(load average {", ".join(f"{v:.1f}" for v in os.getloadavg())})')
  base = statistics.median(times[baseline]) if baseline else None
  best = min((statistics.median(t) for name, t in times.items() if name.startswith('pytorch')), default=None)
  for name, t in times.items():
    ratio = f'   {statistics.median(t) / base:5.2f}x pytorch, {statistics.median(t) / best:5.2f}x its best row' if base else ''
    print(f'  {name:50s} {statistics.median(t) * 1e3:8.1f} ms/step  '
          f'(quartiles {_quantile(t, 0.25) * 1e3:.0f}-{_quantile(t, 0.75) * 1e3:.0f}){ratio}')
  return {name: statistics.median(t) for name, t in times.items()}


def _quantile(values, q):
  values = sorted(values)
  return values[min(len(values) - 1, int(q * len(values)))]


# ----------------------------------------------------------------------------
# Profiles: where one training step's time goes.

CATEGORIES = ('conv forward', 'conv backward-data', 'conv backward-filter', 'conv backward (data + filter)',
              'batch norm', 'relu', 'bias add', 'max pool', 'dense layers', 'loss', 'optimizer (adam)', 'other')


def _hlo_instructions(hlo_text):
  """`{name: (shape, opcode, op_name, operands)}` of the entry computation's instructions."""
  entry = hlo_text[hlo_text.index('\nENTRY'):]
  found = {}
  for line in entry.splitlines()[1:]:
    match = re.match(r'\s*(?:ROOT )?%(\S+) = (\([^)]*\)|\S+) ([\w\-]+)\((.*)', line)
    if match:
      name, shape, opcode, rest = match.groups()
      op_name = re.search(r'op_name="([^"]*)"', line)
      operands = re.findall(r'%([\w.\-]+)', rest.split('metadata=')[0])
      found[name] = (shape, opcode, op_name.group(1) if op_name else '', operands)
  return found


def _jax_category(name, instructions, users, depth=0):
  """A thunk's category from its HLO metadata: the jax op and the Flax module (cifar_cnn's names) that made it."""
  if name not in instructions:
    return 'other'
  shape, opcode, op_name, _ = instructions[name]
  backward = 'transpose(' in op_name
  conv_layer = re.search(r'/linear_[0-5]/(\w+)', op_name)  # cifar_cnn: linear_0..5 are the convolutions
  category = 'other'
  if conv_layer:
    op = conv_layer.group(1)
    if op == 'add' and not backward or op == 'reduce_sum':
      category = 'bias add'  # the bias and its gradient
    elif not backward:
      category = 'conv forward'
    elif re.search(r'\[\d+,3,3,\d+\]|\[\d+,\d+\]', shape) or op == 'transpose':
      category = 'conv backward-filter'
    else:
      category = 'conv backward-data'
  elif '/norm_' in op_name:
    category = 'batch norm'
  elif 'reduce_window' in op_name or 'select_and_scatter' in op_name or 'reduce-window' in opcode:
    category = 'max pool'
  elif '/linear_' in op_name or '/head/' in op_name:
    category = 'dense layers'
  elif 'relu' in op_name or re.search(r'Net\._block/(select_n|gt|max)', op_name):
    category = 'relu'
  elif re.search(r'\(Net\)\)?/(max|select_n|eq|gt|ne|and|or|slice|pad|add|mul|div|convert_element_type)', op_name):
    category = 'max pool'  # conv.max_pool: strided-slice maxima and their gradient
  elif 'jvp(' in op_name or 'transpose(' in op_name:
    category = 'loss'
  elif op_name.startswith('jit('):
    category = 'optimizer (adam)'  # and the step's bookkeeping
  if category == 'other' and depth < 4:  # e.g. an index array made for its user
    for user in users.get(name, ()):
      category = _jax_category(user, instructions, users, depth + 1)
      if category != 'other':
        break
  if category == 'conv backward-data' and 'copy' in name and any(
      re.search(r'\[\d+,3,3,\d+\]', instructions[u][0]) for u in users.get(name, ()) if u in instructions):
    category = 'conv backward-filter'  # layout copies feeding the filter gradient
  return category


def profile_jax(run_step, compiled_text, steps, categorize=None):
  """`({category: ms per step}, wall ms per step)` from XLA:CPU's per-thunk trace events.

  Thunks run concurrently on the executor's threads: each moment's wall time
  is split equally among the thunks running then, so the categories add up to
  the time some thunk was running. `categorize(name, instructions, users)`:
  a thunk's category (default `_jax_category`, cifar_cnn's).
  """
  categorize = categorize or _jax_category
  instructions = _hlo_instructions(compiled_text)
  users = collections.defaultdict(list)
  for name, (_, _, _, operands) in instructions.items():
    for operand in operands:
      users[operand].append(name)
  directory = tempfile.mkdtemp()
  start = time.perf_counter()
  with jax.profiler.trace(directory):
    for _ in range(steps):
      run_step()
  wall = (time.perf_counter() - start) / steps
  trace = next(Path(directory).rglob('*.trace.json.gz'))
  events = [e for e in json.load(gzip.open(trace))['traceEvents'] if e.get('ph') == 'X' and 'hlo_op' in e.get('args', {})]
  share = _exclusive_shares(events)
  totals = collections.Counter()
  for event, seconds in zip(events, share):
    totals[categorize(event['args']['hlo_op'], instructions, users)] += seconds
  return {k: v / steps / 1e3 for k, v in totals.items()}, wall * 1e3


def _exclusive_shares(events):
  """Each event's share of wall time (microseconds) when overlapping events split the overlap equally."""
  boundaries = sorted({e['ts'] for e in events} | {e['ts'] + e['dur'] for e in events})
  index = {t: i for i, t in enumerate(boundaries)}
  running = [0] * len(boundaries)
  for e in events:
    running[index[e['ts']]] += 1
    running[index[e['ts'] + e['dur']]] -= 1
  active, width = 0, []
  for i in range(len(boundaries) - 1):
    active += running[i]
    width.append((boundaries[i + 1] - boundaries[i]) / max(active, 1))
  prefix = [0.0]
  for w in width:
    prefix.append(prefix[-1] + w)
  return [prefix[index[e['ts'] + e['dur']]] - prefix[index[e['ts']]] for e in events]


_TORCH_CATEGORIES = (
    ('Optimizer.', 'optimizer (adam)'), ('ConvolutionBackward', 'conv backward (data + filter)'),
    ('convolution_backward', 'conv backward (data + filter)'), ('convolution', 'conv forward'),
    ('BatchNorm', 'batch norm'), ('batch_norm', 'batch norm'), ('MaxPool', 'max pool'), ('max_pool', 'max pool'),
    ('Relu', 'relu'), ('relu', 'relu'), ('threshold_backward', 'relu'), ('clamp_min', 'relu'),
    ('Addmm', 'dense layers'), ('addmm', 'dense layers'), ('aten::mm', 'dense layers'), ('aten::t', 'dense layers'),
    ('softmax', 'loss'), ('nll_loss', 'loss'), ('cross_entropy', 'loss'),
)


def profile_torch(run, steps, categories=None):
  """`({category: ms per step}, wall ms per step)` from torch.profiler's CPU events (self times, by nearest labelled ancestor)."""
  torch = run.torch
  categories = categories or _TORCH_CATEGORIES
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    run(steps)
    wall = (time.perf_counter() - start) / steps
  totals = collections.Counter()
  for event in prof.events():
    category, node = 'other', event
    while node is not None and category == 'other':
      category = next((c for key, c in categories if key in node.name), 'other')
      node = node.cpu_parent
    totals[category] += event.self_cpu_time_total
  return {k: v / steps / 1e3 for k, v in totals.items()}, wall * 1e3


def profile(batch, steps):
  images, labels = synthetic_cifar()
  columns = {}
  for title, conv, pool in (('bnjax, before #17', True, True), ('bnjax (conv.Conv, conv.max_pool)', False, False)):
    with layers_before_17(conv, pool):
      model = models.get('cifar_cnn', norm='bn', conv_impl='cpu_fast')
      step, text = _engine_step(model, images, labels, batch)
    run_step = lambda step=step: jax.block_until_ready(step())
    run_step()
    columns[title] = profile_jax(run_step, text, steps)
  if jax.device_count() > 1 and batch % jax.device_count() == 0:
    run = data_parallel_contender(images, labels, batch)
    columns[f'bnjax over {jax.device_count()} CPU devices'] = profile_jax(lambda: run(1), run.compiled_text, steps)
  run = torch_contender(batch)
  if run is not None:
    columns['pytorch'] = profile_torch(run, steps)
  print_profile(f'Where one cifar_cnn training step goes, batch {batch}, ms per step (mean of {steps} steps, '
                f'load average {os.getloadavg()[0]:.1f}); allocator: {ALLOCATOR}', columns, CATEGORIES)


def print_profile(title, columns, categories, label_width=32, column_width=34):
  """Prints `{column title: ({category: ms}, wall ms)}` as a table, one row per category present."""
  print(f'\n{title}')
  print('  ' + ' ' * label_width + ''.join(f'{name:>{column_width}s}' for name in columns))
  rows = [(category, [split.get(category, 0.0) for split, _ in columns.values()])
          for category in categories if any(category in split for split, _ in columns.values())]
  rows += [('sum of the above', [sum(split.values()) for split, _ in columns.values()]),
           ('wall (profiled)', [wall for _, wall in columns.values()])]
  for label, values in rows:
    print(f'  {label:{label_width}s}' + ''.join(f'{value:{column_width}.1f}' for value in values))


def _engine_step(model, images, labels, batch, mesh=None):
  """`(step, compiled HLO text)`: `step()` dispatches one engine step (as in `bnjax_engine`) and returns its
  metrics; with a `mesh`, the data-parallel step over its devices (`bnjax.lab.parallel`)."""
  import optax

  tx = optax.adam(LR)
  state = engine.init_train_state(model, tx, 0, images[:1])
  batches = engine.epoch_batches(state, 0, images.shape[0], batch)
  if mesh is None:
    steps = engine.make_train_steps(model, tx, unroll=True)
  else:
    steps = engine.make_data_parallel_train_steps(model, tx, mesh, batch_size=batch, unroll=True)
    state, images, labels = parallel.replicate((state, images, labels), mesh)
  holder = [state]
  compiled = jax.jit(steps, donate_argnums=0).lower(holder[0], images, labels, batches[:1]).compile()
  counter = [0]

  def step():
    i = counter[0] % batches.shape[0]
    counter[0] += 1
    holder[0], metrics = compiled(holder[0], images, labels, batches[i : i + 1])
    return metrics

  return step, compiled.as_text()


def main():
  args = ARGS
  print(f'jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}, {os.cpu_count()} cores; '
        f'allocator: {ALLOCATOR}; '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  for batch in args.batch:
    steps = args.steps or max(1, 128 // batch)
    if args.profile:
      profile(batch, max(steps, 5))
    else:
      compare(batch, args.rounds, steps, args.torch_compile)


if __name__ == '__main__':
  main()
