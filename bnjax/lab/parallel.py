"""Processes, meshes and device placement: where the engine's multi-device steps run, on JAX's own runtime.

    mesh = parallel.make_mesh(8)                                    # Mesh(('batch',))
    state, data = parallel.replicate((state, (images, labels)), mesh)
    metrics = parallel.gather(metrics)                              # readable by every process

What the steps do over these meshes is `bnjax.lab.engine`'s
(`make_data_parallel_train_steps`: one run's batch split along `AXIS`;
`over_lanes`: K runs split along `RUNS_AXIS`).

Multi-host: `initialize` (called first thing by experiments/train.py) starts
`jax.distributed`; afterwards `jax.devices()` lists every process's devices,
the mesh spans them all, and every process runs the same program; process 0
writes the outputs (`is_main_process`) and decides for all (`from_main_process`).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'batch'  # a data-parallel run's batch is split along it
RUNS_AXIS = 'runs'  # a sweep group's lanes are split along it
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


def lane_mesh(num_lanes: int) -> Mesh | None:
  """A 1-D mesh along `RUNS_AXIS` for a group of `num_lanes` runs, or None (one device, one process).

  Its devices: this process's, or every process's devices under
  `jax.distributed` (every process then trains the same group together).
  """
  distributed = jax.process_count() > 1
  devices = jax.devices() if distributed else jax.local_devices()
  if not distributed and (len(devices) < 2 or num_lanes < 2):
    return None
  return Mesh(np.asarray(devices), (RUNS_AXIS,))


def shard_batch_spec() -> P:
  """Spec of `[S, B]` batch indices: the batch axis split over the devices."""
  return P(None, AXIS)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies of `tree`'s arrays on every device of `mesh` (global arrays, also across processes)."""
  return put(tree, NamedSharding(mesh, P()))


def split_lanes(tree: Any, mesh: Mesh) -> Any:
  """`tree`'s arrays with their leading (lane) axis split over `mesh`'s `RUNS_AXIS`."""
  return put(tree, NamedSharding(mesh, P(RUNS_AXIS)))


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
