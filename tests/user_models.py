"""Models from a user's own code, which bnjax has never seen: the lab trains them by import path.

    python experiments/train.py --model=user_models:build          # (tests/ on PYTHONPATH)
    python experiments/train.py --model=user_models:build_nnx

`build` is a linen module taking the lab's norm layer and activation;
`build_nnx` an NNX module with bnjax's NNX BatchNorm, turned into a linen
module by `flax.nnx.bridge.ToLinen`; the others are broken on purpose, for
the one-line errors (tests/test_registry.py).
"""

from typing import Callable

import flax.linen as nn
from flax import nnx
from flax.nnx import bridge

import bnjax.nnx


class SmallNet(nn.Module):
  """Flatten -> Dense 32 -> norm -> activation -> Dense; the norm layer named as the user likes."""

  norm: Callable
  activation: Callable = nn.relu
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(32, name='hidden')(x.reshape(x.shape[0], -1))
    x = self.norm(name='my_bn')(x, use_running_average=not train)
    return nn.Dense(self.num_classes, name='out')(self.activation(x))


def build(*, norm, activation, num_classes=10):
  """The lab passes `norm` (a factory of its norm layers), `activation` and `num_classes`."""
  return SmallNet(norm, activation, num_classes)


class NnxNet(nnx.Module):
  """Flatten -> Linear 32 -> bnjax.nnx.BatchNorm -> ReLU -> Linear."""

  def __init__(self, features: int, num_classes: int, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(features, 32, rngs=rngs)
    self.norm = bnjax.nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
    self.out = nnx.Linear(32, num_classes, rngs=rngs)

  def __call__(self, x, train: bool = False):
    x = self.hidden(x.reshape(x.shape[0], -1))
    return self.out(nnx.relu(self.norm(x, use_running_average=not train)))


def build_nnx(num_classes=10):
  """An NNX module as a linen module (its BatchNorm statistics become the `batch_stats` collection)."""
  return bridge.ToLinen(NnxNet, args=(28 * 28, num_classes))


def build_raises(*, norm):
  raise RuntimeError('this builder is broken')


class NoNorm(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def build_without_norm(*, norm, num_classes=10):
  """Takes the norm factory and never calls it."""
  return NoNorm(num_classes)


NOT_A_BUILDER = 3
