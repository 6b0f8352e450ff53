"""Process-wide host settings the CLIs apply before JAX starts.

`retain_freed_memory`: glibc's malloc keeps freed memory for reuse. XLA:CPU
allocates a step's temporaries (70 MB for the CIFAR CNN at batch 32, 560 MB
at 256) on its executor threads, and glibc serves blocks that large with a
fresh `mmap` that is page-faulted in on every step and unmapped after it:
17,300 minor faults and 40 ms of kernel time per step at batch 32, a 0.79x
step time when they are gone (docs/cpu_convolutions.md). Numbers are
unchanged; the price is that the process keeps its peak host memory.
"""

from __future__ import annotations

import ctypes

# mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
HOST_ALLOCATORS = ('retain', 'glibc')


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
