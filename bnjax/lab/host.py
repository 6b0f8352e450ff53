"""Process-wide host settings the CLIs apply before JAX starts.

`retain_freed_memory`: glibc's malloc keeps freed memory for reuse. XLA:CPU
allocates a step's temporaries (70 MB for the CIFAR CNN at batch 32, 560 MB
at 256) on its executor threads, and glibc serves blocks that large with a
fresh `mmap` that is page-faulted in on every step and unmapped after it:
17,300 minor faults and 40 ms of kernel time per step at batch 32, a 0.79x
step time when they are gone (docs/cpu_convolutions.md). Numbers are
unchanged; the price is that the process keeps its peak host memory.

`split_cpu`: the CPU as several JAX devices (`jax_num_cpu_devices`). XLA:CPU
runs one device's step mostly one operation at a time, on about 1.2 of 2
cores for the CIFAR CNN; with one device per core, the lab's data
parallelism (`bnjax.lab.parallel`, BN statistics synchronized over the
devices) gives each core its share of the batch: 0.74x the CNN's step time
at batch 32 on 2 cores (docs/cpu_convolutions.md). Sweeps put their lanes
on the devices instead.
"""

from __future__ import annotations

import ctypes
import os

# mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
HOST_ALLOCATORS = ('retain', 'glibc')
AUTO = 'auto'


def retain_freed_memory() -> bool:
  """Make glibc malloc keep freed memory for reuse instead of unmapping it; True if it took.

  One arena for all threads (XLA's executor threads included), no mmap for
  large blocks (they come from the heap), no trimming of the heap's top. Call
  it before JAX creates its CPU client (threads that already have an arena
  keep it). The same as starting the process with
  `GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647`.
  Elsewhere than glibc (macOS, musl) it does nothing and returns False.
  """
  try:
    libc = ctypes.CDLL('libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
  return all(mallopt(option, value) == 1 for option, value in settings)


def apply(allocator: str) -> bool:
  """The CLIs' `--host_allocator`: 'retain' (`retain_freed_memory`) or 'glibc' (its defaults)."""
  if allocator not in HOST_ALLOCATORS:
    raise ValueError(f'--host_allocator={allocator!r} is invalid: expected one of {", ".join(HOST_ALLOCATORS)}.')
  return retain_freed_memory() if allocator == 'retain' else False


def cpu_cores() -> int:
  """The cores this process may run on (its CPU affinity, where the OS tells it)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def parse_cpu_devices(value: str | int | None) -> int | None:
  """The CLIs' `--cpu_devices`: None (unset: JAX's default), 'auto' (one per core) or a count >= 1."""
  if value is None:
    return None
  if str(value).strip().lower() == AUTO:
    return cpu_cores()
  try:
    count = int(value)
  except ValueError:
    count = 0
  if count < 1:
    raise ValueError(f'--cpu_devices={value!r} is invalid: expected {AUTO!r} (one per core: {cpu_cores()}) or a '
                     'number of devices >= 1.')
  return count


def split_cpu(value: str | int | None) -> int | None:
  """Make JAX's CPU backend `parse_cpu_devices(value)` devices; call it before JAX runs anything.

  Returns the count set, or None (unset: left to JAX, i.e. 1 or
  `--xla_force_host_platform_device_count` in XLA_FLAGS). Only the CPU
  backend is split: on a GPU or TPU the accelerators stay the devices.
  """
  count = parse_cpu_devices(value)
  if count is not None:
    import jax

    try:
      jax.config.update('jax_num_cpu_devices', count)
    except RuntimeError as error:  # JAX already started its backends
      raise ValueError(f'--cpu_devices={value} must be applied before JAX starts: {error}') from None
  return count
