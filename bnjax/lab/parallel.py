"""Data parallelism: one training step over every device (and host), on JAX's own runtime.

    mesh = parallel.make_mesh(8)                                    # Mesh(('batch',))
    train_steps = jax.jit(parallel.make_train_steps(model, optimizer, mesh, batch_size=512), donate_argnums=0)
    state = parallel.replicate(state, mesh)
    images, labels = parallel.replicate((images, labels), mesh)
    state, metrics = train_steps(state, images, labels, batch_indices)   # [S, 512] global indices

Design (measured against jit's SPMD partitioning, see benchmarks/bench_parallel.py):
the engine's steps run inside `jax.shard_map` over a 1-D mesh with axis
'batch'. The training state and the data arrays are replicated; the global
batch indices `[S, B]` (from `engine.epoch_batches`: the same permutation on
every process, given the seed) are sharded on their batch axis, so device d
takes the contiguous slice `[d * B/D, (d+1) * B/D)` of every global batch and
gathers its examples from its own copy of the data. Each host therefore only
ever reads its devices' slices of each batch; the arrays are replicated
because the data sets of this study fit in every device's memory.

Inside, the model is built with `axis_name='batch'` so that BN reduces across
devices (`bnjax.norm`):
- 'sync': the statistics of the whole global batch (all-reduce of per-device
  sums, weighted by valid counts), exactly as on one device with the global
  batch;
- 'local': each device normalizes its own shard (multi-GPU training without
  sync BN): ghost BN with the per-device batch as the virtual batch. The
  moving statistics pool every device's groups, so they stay identical on
  every device.
The loss is each device's sum over the global batch size; autodiff under
`shard_map` sums the gradient of the replicated (unvarying) parameters over
devices, which is then the gradient of the global mean (`engine.train_step`
with `axis_name`); the metrics' sums are `psum`'d. Every device then applies
the same update to its replica: no parameter ever differs across devices
(`check_vma` would refuse a varying state as a replicated output).

Multi-host: `initialize` (called first thing by experiments/train.py) starts
`jax.distributed`; afterwards `jax.devices()` lists every process's devices,
the mesh spans them all, and every process runs the same program.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bnjax.lab import engine
from bnjax.lab.options import NORM_KINDS, OPTIONS

AXIS = 'batch'
CROSS_DEVICE_STATS = OPTIONS['cross_device_stats'].choices
# Environment variables read when the flags leave the distributed settings unset.
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = 'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'


# Seconds every process waits for the others at the coordinator before giving up (JAX's default is 300).
COORDINATOR_TIMEOUT = 120


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout: float = COORDINATOR_TIMEOUT) -> bool:
  """Starts `jax.distributed` when asked; returns whether it did. Call before any other JAX call.

  Asked means: `coordinator_address` (or $JAX_COORDINATOR_ADDRESS) is set, or
  `num_processes` (or $JAX_NUM_PROCESSES) is more than 1. `'auto'` lets JAX
  detect the cluster (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes);
  otherwise `host:port` of process 0's coordinator, the number of processes
  and this process's id (flags, else $JAX_NUM_PROCESSES / $JAX_PROCESS_ID).

  `timeout` bounds the wait for the other processes: a process other than
  0 first waits for the coordinator's port (ConnectionError, one line, when
  it doesn't answer in time); then JAX's own deadline applies (XLA ends the
  process with its own error when it passes).

  Raises:
    ConnectionError (one line, naming --coordinator_address) when the
    coordinator doesn't answer within `timeout` seconds; ValueError for a
    `timeout` that is not a positive finite number.
  """
  import math

  if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
    raise ValueError(f'--coordinator_timeout={timeout!r} is invalid: expected a finite number of seconds > 0.')
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  if coordinator_address is None and (num_processes or 1) <= 1:
    return False
  seconds = max(1, math.ceil(timeout))
  if coordinator_address != 'auto' and (coordinator_address is None or num_processes is None or process_id is None):
    raise ValueError(
        f'multi-process training needs --coordinator_address (host:port of process 0), --num_processes '
        f'and --process_id (or ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID}); got '
        f'{coordinator_address!r}, {num_processes!r}, {process_id!r}. Use --coordinator_address=auto on '
        'a Cloud TPU pod slice or under SLURM / Open MPI.'
    )
  address = None if coordinator_address == 'auto' else coordinator_address
  if address is not None and process_id != 0:
    # XLA's client aborts the process (a C++ fatal error, pages of stack) when its deadline passes: wait for the
    # coordinator's port here first, where giving up can be one line.
    _wait_for_coordinator(address, timeout)
  jax.distributed.initialize(address, num_processes, process_id, initialization_timeout=seconds)
  return True


def _wait_for_coordinator(address: str, timeout: float) -> None:
  """Returns once `host:port` accepts a TCP connection; ConnectionError (one line) after `timeout` seconds."""
  import socket
  import time

  host, _, port = address.rpartition(':')
  host = host.strip('[]')
  if not host or not port.isdigit():
    raise ValueError(f'--coordinator_address={address!r} is invalid: expected host:port of process 0 (or auto).')
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
        return
    except OSError as error:
      if time.monotonic() >= deadline:
        raise ConnectionError(
            f'--coordinator_address={address}: no coordinator answered within {timeout:g} s ({error}): start '
            'process 0 (it serves that address), check the host and port, or wait longer with '
            '--coordinator_timeout.') from None
    time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def is_main_process() -> bool:
  """Whether this process writes the outputs (process 0)."""
  return jax.process_index() == 0


def from_main_process(value):
  """`value` (a bool or a list of bools) as process 0 has it: its decisions, the same in every process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  result = multihost_utils.broadcast_one_to_all(np.asarray(value))
  return result.tolist() if isinstance(value, list) else bool(result)


def resolve_num_devices(num_devices: int | None) -> int:
  """`num_devices`, or every device of every process when None; checked against what exists."""
  available = jax.device_count()
  if num_devices is None:
    return available
  if not 1 <= num_devices <= available:
    raise ValueError(f'--num_devices={num_devices} is invalid: expected 1 to {available} (the devices JAX sees).')
  if jax.process_count() > 1 and num_devices != available:
    raise ValueError(
        f'--num_devices={num_devices} is invalid with {jax.process_count()} processes: expected every '
        f'device ({available}) or unset.'
    )
  return num_devices


def per_device_batch(batch_size: int, num_devices: int) -> int:
  """`batch_size / num_devices`; a clear error when it does not divide."""
  if batch_size % num_devices:
    raise ValueError(
        f'--batch_size={batch_size} does not divide over --num_devices={num_devices}: expected a multiple '
        f'of {num_devices} (e.g. {batch_size // num_devices * num_devices or num_devices}), so that every '
        'device holds the same number of examples.'
    )
  return batch_size // num_devices


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh `('batch',)` over the first `num_devices` devices (default: all, every process)."""
  num_devices = resolve_num_devices(num_devices)
  return Mesh(np.array(jax.devices()[:num_devices]), (AXIS,))


def shard_batch_spec() -> P:
  """Spec of `[S, B]` batch indices: the batch axis split over the devices."""
  return P(None, AXIS)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies of `tree`'s arrays on every device of `mesh` (global arrays, also across processes)."""
  return put(tree, NamedSharding(mesh, P()))


def put(tree: Any, sharding: NamedSharding) -> Any:
  """`tree`'s arrays as global arrays laid out by `sharding`, also across processes.

  Every process passes the same values (e.g. computed from the same seeds);
  each keeps only its own devices' parts. `jax.device_put` would need every
  device to be this process's.
  """
  arrays = {}  # a leaf given twice (e.g. val_images is test_images) is put once

  def put_leaf(leaf):
    if id(leaf) not in arrays:
      value = np.asarray(jax.device_get(leaf))
      arrays[id(leaf)] = jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    return arrays[id(leaf)]

  return jax.tree.map(put_leaf, tree)


def gather(tree: Any) -> Any:
  """`tree`'s arrays readable by every process (all-gathered when they are split across processes).

  Lanes sharded over every process's devices (`bnjax.lab.programs.lanes`)
  give metrics that no one process holds; the host reads them through this.
  """
  leaves, treedef = jax.tree.flatten(tree)
  if all(getattr(leaf, 'is_fully_addressable', True) for leaf in leaves):
    return tree
  return _replicator(tuple(NamedSharding(leaf.sharding.mesh, P()) for leaf in leaves), treedef)(tree)


@functools.lru_cache(maxsize=None)
def _replicator(shardings: tuple, treedef) -> Callable:
  return jax.jit(lambda tree: tree, out_shardings=jax.tree.unflatten(treedef, shardings))


def device_model(model: nn.Module, cross_device_stats: str, local_batch: int) -> nn.Module:
  """`model` as each device runs it: BN over the mapped axis, 'sync' or 'local' statistics.

  'local' is ghost BN with the per-device batch as the virtual batch; a model
  that already has ghost batches (norm='ghost', or renorm with
  `virtual_batch_size`) keeps its groups, which must then divide `local_batch`
  (groups never straddle devices): both modes are then the same.
  """
  if cross_device_stats not in CROSS_DEVICE_STATS:
    raise ValueError(f'--cross_device_stats={cross_device_stats!r} is invalid: expected one of {CROSS_DEVICE_STATS}.')
  norm = getattr(model, 'norm', None)
  virtual = getattr(model, 'virtual_batch_size', None)
  if norm is None or not NORM_KINDS[norm].cross_device:
    return model
  if virtual is not None:
    if local_batch % virtual:
      raise ValueError(
          f'--virtual_batch_size={virtual} does not divide the per-device batch {local_batch} '
          '(--batch_size / --num_devices): ghost batches must not straddle devices.'
      )
    return model.clone(axis_name=AXIS)
  if cross_device_stats == 'local':
    return model.clone(axis_name=AXIS, norm='ghost' if norm == 'bn' else norm,
                       norm_options={**model.norm_options, 'virtual_batch_size': local_batch})
  return model.clone(axis_name=AXIS)


def make_train_steps(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    batch_size: int,
    cross_device_stats: str = 'sync',
    update_stats: bool = True,
    augment: Callable | None = None,
    unroll: bool = False,
    freeze_norm: bool = False,
) -> Callable:
  """`engine.make_train_steps`'s `run(state, images, labels, batch_indices [S, B], hparams)`, data-parallel.

  `state`, `images`, `labels` replicated over `mesh` (`replicate`),
  `batch_indices` the global batches' indices (`B = batch_size`); returns the
  replicated new state and the metrics summed over the global batches. Not
  jitted (jit it with the state donated).
  """
  local_batch = per_device_batch(batch_size, mesh.size)
  run = engine.make_train_steps(
      device_model(model, cross_device_stats, local_batch), optimizer,
      update_stats=update_stats, augment=augment, unroll=unroll, axis_name=AXIS, freeze_norm=freeze_norm,
  )
  sharded = jax.shard_map(
      run, mesh=mesh, in_specs=(P(), P(), P(), shard_batch_spec(), P()), out_specs=(P(), P())
  )

  def parallel_run(state, images, labels, batch_indices, hparams=None):
    if batch_indices.shape[-1] != batch_size:
      raise ValueError(f'batch_indices has shape {batch_indices.shape}; expected [steps, {batch_size}].')
    return sharded(state, images, labels, batch_indices, hparams)

  return parallel_run


def make_evaluate(model: nn.Module, mesh: Mesh, *, batch_size: int, eval_stats: str = 'moving') -> Callable:
  """`engine.make_evaluate`'s `evaluate(state, images, labels, hparams) -> Metrics`, its work split over `mesh`.

  With the moving statistics each example's prediction is its own: every
  device evaluates a contiguous `1/D` of the (replicated) examples, in
  batches of `batch_size / D`, and the metrics are summed over the devices;
  the last `num % D` examples are evaluated on every device. With
  `eval_stats='batch'` which examples share a batch is part of the result,
  so that evaluation stays `engine.make_evaluate`'s, replicated (it runs
  once, at the end of a run). Not jitted.
  """
  whole = engine.make_evaluate(model, batch_size=batch_size, eval_stats=eval_stats)
  if eval_stats != 'moving' or mesh.size == 1:
    return whole
  local = engine.make_evaluate(model, batch_size=-(-batch_size // mesh.size))

  def summed(state, images, labels, hparams):
    return jax.tree.map(lambda total: jax.lax.psum(total, AXIS), local(state, images, labels, hparams))

  # check_vma=False: the engine's scan starts its sums from (unvarying) zeros and adds each device's own metrics.
  sharded = jax.shard_map(summed, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P()), out_specs=P(), check_vma=False)

  def evaluate(state, images, labels, hparams=None):
    split = images.shape[0] - images.shape[0] % mesh.size
    totals = sharded(state, images[:split], labels[:split], hparams)
    if split < images.shape[0]:
      rest = whole(state, images[split:], labels[split:], hparams)
      totals = jax.tree.map(lambda a, b: a + b, totals, rest)
    return totals

  return evaluate
