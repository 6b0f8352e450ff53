"""Registers a toy norm kind from user code, then runs a lab CLI: `python toy_norm_kind.py SCRIPT FLAGS...`.

The toy kind is the whole cost of a new idea: its function (a pure JAX
normalization: each feature divided by its root mean square over the batch),
its Flax wrapper, and one table entry. No file of bnjax is edited.
"""

import runpy
import sys
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp

from bnjax.lab import options


def rms_normalize(x, epsilon):
  """x `[N, ..., C]` divided by each feature's root mean square over every axis but the last."""
  axes = tuple(range(x.ndim - 1))
  return x * jnp.reciprocal(jnp.sqrt(jnp.mean(jnp.square(x), axis=axes) + epsilon))


class RMSNorm(nn.Module):
  epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x, use_running_average=None):
    return rms_normalize(x, self.epsilon)


options.register_norm_kind(options.NormKind(
    'rms', 'toy: divide by the batch root mean square', lambda opts, name: RMSNorm(**opts, name=name),
    options=('epsilon',)))

script = Path(__file__).resolve().parents[2] / 'experiments' / sys.argv[1]
sys.argv = [str(script)] + sys.argv[2:]
runpy.run_path(str(script), run_name='__main__')
