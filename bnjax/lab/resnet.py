"""ResNet-20/32/56 for CIFAR-10 (He et al. 2016, "Deep Residual Learning", section 4.2).

    model = ResNet(depth=20)                                 # 269,722 parameters (the paper: 0.27M)
    variables = model.init(key, x)                           # {'params', 'batch_stats'}; x [N, 32, 32, 3]
    logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    logits = model.apply({**variables, **updates}, x)       # evaluation: the moving statistics

The paper's CIFAR network: a 3x3 convolution of 16 channels, then 3 stages
of n basic blocks (depth = 6n + 2: n = 3, 5, 9 for ResNet-20, 32, 56) with
16, 32 and 64 channels on 32x32, 16x16 and 8x8 maps, then global average
pooling and a Dense 10. A basic block is conv3x3 -> BN -> ReLU -> conv3x3
-> BN, plus the shortcut, then ReLU; the first block of stages 2 and 3
halves the map with a stride-2 convolution. Every convolution is followed
by BN, so no convolution has a bias.

Shortcuts are the paper's option A (parameter-free): where the shape
changes, the input is subsampled (every other row and column) and its
channels are zero-padded, half of the new channels on each side (as the
common PyTorch reproduction does); elsewhere the identity.

Initialization: convolution kernels He normal with fan_out (untruncated
normal, variance 2 / (9 * out_channels); torchvision's
`kaiming_normal_(mode='fan_out')`), the Dense layer flax's default
(LeCun normal, zero bias), BN scale 1 and bias 0.

`norm` is injectable: a callable `norm(name=...)` returning a Flax module
called as `module(x, use_running_average=...)` (`bnjax.linen.BatchNorm`
and `flax.linen.BatchNorm` both are); default `bnjax.linen.BatchNorm` with
momentum 0.9 and epsilon 1e-5 (PyTorch's BatchNorm2d: momentum 0.1 there
is the weight of the new value). `conv` is the convolution module class
(default `bnjax.lab.conv.Conv`: flax's Conv with the CPU fast path of its
stride-1 3x3 kernel gradient; `flax.linen.Conv` gives the same numbers).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from bnjax import linen as bn_linen
from bnjax.lab import conv as conv_lib

Array = jnp.ndarray

# The paper's depths: 6n + 2 layers with n blocks per stage.
DEPTHS = (20, 32, 44, 56, 110)
STAGE_CHANNELS = (16, 32, 64)

he_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
default_norm = functools.partial(bn_linen.BatchNorm, momentum=0.9, epsilon=1e-5)


def blocks_per_stage(depth: int) -> int:
  """n for depth = 6n + 2; a ValueError naming the depths the paper uses otherwise."""
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f'ResNet depth {depth} is not 6n + 2; the paper uses {", ".join(map(str, DEPTHS))}.')
  return (depth - 2) // 6


def option_a_shortcut(x: Array, channels: int, stride: int) -> Array:
  """The parameter-free shortcut: `[N, H, W, C] -> [N, H / stride, W / stride, channels]`.

  Subsamples every `stride`-th row and column and zero-pads the channels,
  `(channels - C) // 2` on each side; the identity when nothing changes.
  """
  if stride > 1:
    x = x[:, ::stride, ::stride, :]
  extra = channels - x.shape[-1]
  if extra:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  return x


class BasicBlock(nn.Module):
  """conv3x3(stride) -> norm -> ReLU -> conv3x3 -> norm, + option-A shortcut, -> ReLU."""

  channels: int
  stride: int = 1
  norm: Callable[..., nn.Module] = default_norm
  conv: Any = conv_lib.Conv

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    conv = functools.partial(
        self.conv, self.channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=he_normal_fan_out
    )
    y = conv(strides=(self.stride, self.stride), name='conv_0')(x)
    y = nn.relu(self.norm(name='norm_0')(y, use_running_average=not train))
    y = conv(name='conv_1')(y)
    y = self.norm(name='norm_1')(y, use_running_average=not train)
    return nn.relu(y + option_a_shortcut(x, self.channels, self.stride))


class ResNet(nn.Module):
  """ResNet-`depth` for CIFAR (depth 6n + 2): `logits [N, num_classes] = ResNet(...)(x [N, H, W, 3], train)`."""

  depth: int = 20
  num_classes: int = 10
  norm: Callable[..., nn.Module] = default_norm
  conv: Any = conv_lib.Conv

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    n = blocks_per_stage(self.depth)
    x = self.conv(
        STAGE_CHANNELS[0], (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=he_normal_fan_out,
        name='conv_0',
    )(x)
    x = nn.relu(self.norm(name='norm_0')(x, use_running_average=not train))
    for stage, channels in enumerate(STAGE_CHANNELS):
      for block in range(n):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(channels, stride, self.norm, self.conv, name=f'stage{stage}_block{block}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='head')(x)


def build(depth: int = 20, *, norm: Callable[..., Any] = default_norm, num_classes: int = 10,
          conv_impl: str = 'cpu_fast') -> ResNet:
  """The registry's builder (`bnjax.lab.registry`: resnet20, resnet32, resnet56): the lab gives the norm layer
  factory and the convolutions (`conv_impl`: 'xla' flax.linen.Conv, 'cpu_fast' `bnjax.lab.conv.Conv`, the
  same numbers)."""
  return ResNet(depth=depth, num_classes=num_classes, norm=norm, conv=nn.Conv if conv_impl == 'xla' else conv_lib.Conv)
