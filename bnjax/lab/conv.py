"""The CNN's layers with fast paths on XLA:CPU: `Conv` (a drop-in for `flax.linen.Conv`) and `max_pool`.

    linear = Conv(features, (3, 3), padding='SAME', kernel_init=...)   # as flax.linen.Conv
    x = max_pool(x, 2)                                                  # as nn.max_pool(x, (2, 2), strides=(2, 2))

What is slow on XLA:CPU, and what these do about it (docs/cpu_convolutions.md
has the profiles and the measurements):
- The kernel gradient of a convolution (XLA's "filter gradient" convolution,
  the batch as its contraction) slows down more than linearly with the
  batch: at batch 256, cifar_cnn's six take 3.5x as long as the same work
  done 8 images at a time. `Conv`'s 3x3 SAME stride-1 convolutions on CPU
  (`conv3x3`) compute the kernel gradient as a sum over 8-image slices of
  the batch. Their value and input gradient stay XLA's own, which run at
  this machine's matmul rate (im2col or shifted-matmul forms, and custom
  VJPs built from them, were measured and lose: writing the nine-fold
  patches costs more than they save).
- `nn.max_pool`'s gradient is `select_and_scatter`, which XLA:CPU expands
  into a variadic reduce-window over one index array per dimension and a
  scatter: ten times the pool's own cost. `max_pool` takes the maximum of
  strided slices instead, whose gradient is elementwise.

The fast paths are taken only when tracing for the CPU backend
(`jax.default_backend() == 'cpu'`); on GPU and TPU both are exactly flax's.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import ConvGeneralDilatedT
from jax import lax
from jax.custom_derivatives import SymbolicZero

Array = jnp.ndarray

# The kernel gradient is summed over slices of this many images (XLA:CPU's filter-gradient
# convolution slows down more than linearly with the batch: 3.5x at batch 256).
KERNEL_GRAD_CHUNK = 8


def _on_cpu() -> bool:
  return jax.default_backend() == 'cpu'


def _is_3x3_same(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                 feature_group_count, batch_group_count) -> bool:
  """Whether the arguments ask for the convolution `conv3x3` computes."""
  ones = (None, (1, 1))
  return (
      lhs.ndim == 4
      and rhs.shape[:2] == (3, 3)
      and tuple(window_strides) == (1, 1)
      and (padding == 'SAME' or tuple(map(tuple, padding)) == ((1, 1), (1, 1)))
      and (lhs_dilation is None or tuple(lhs_dilation) in ones)
      and (rhs_dilation is None or tuple(rhs_dilation) in ones)
      and feature_group_count == 1
      and batch_group_count == 1
      and dimension_numbers is not None
      and tuple(getattr(dimension_numbers, 'lhs_spec', ())) == (0, 3, 1, 2)  # NHWC
      and tuple(getattr(dimension_numbers, 'rhs_spec', ())) == (3, 2, 0, 1)  # HWIO
      and tuple(getattr(dimension_numbers, 'out_spec', ())) == (0, 3, 1, 2)  # NHWC
  )


def _xla_conv3x3(x, kernel, precision=None, preferred_element_type=None):
  return lax.conv_general_dilated(
      x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=precision, preferred_element_type=preferred_element_type,
  )


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def conv3x3(x: Array, kernel: Array, precision=None, preferred_element_type=None) -> Array:
  """The CPU path of a 3x3 SAME stride-1 NHWC convolution: `x [N, H, W, C]`, `kernel [3, 3, C, F]` -> `[N, H, W, F]`.

  The value and the input's tangent are XLA's convolution; the kernel's
  tangent goes through the convolution one `KERNEL_GRAD_CHUNK`-image slice
  of the batch at a time, so that reverse mode computes the kernel gradient
  as a sum of per-slice filter gradients (see the module docstring). Any
  order of forward and reverse differentiation works.
  """
  return _xla_conv3x3(x, kernel, precision, preferred_element_type)


@functools.partial(conv3x3.defjvp, symbolic_zeros=True)
def _conv3x3_jvp(precision, preferred_element_type, primals, tangents):
  x, kernel = primals
  x_dot, kernel_dot = tangents
  out = conv3x3(x, kernel, precision, preferred_element_type)
  terms = []
  if not isinstance(x_dot, SymbolicZero):
    terms.append(conv3x3(x_dot, kernel, precision, preferred_element_type))
  if not isinstance(kernel_dot, SymbolicZero):
    chunks = [
        conv3x3(x[start:start + KERNEL_GRAD_CHUNK], kernel_dot, precision, preferred_element_type)
        for start in range(0, x.shape[0], KERNEL_GRAD_CHUNK)
    ]
    terms.append(jnp.concatenate(chunks, axis=0) if len(chunks) > 1 else chunks[0])
  if not terms:
    return out, jnp.zeros_like(out)
  return out, functools.reduce(jnp.add, terms)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None) -> Array:
  """`lax.conv_general_dilated`, except that a 3x3 SAME stride-1 NHWC convolution on CPU is `conv3x3`."""
  if _on_cpu() and _is_3x3_same(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count):
    return conv3x3(lhs, rhs, precision, preferred_element_type)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision, preferred_element_type=preferred_element_type,
  )


class Conv(nn.Conv):
  """`flax.linen.Conv` with the CPU fast path of `conv_general_dilated` above.

  Same fields, parameters (`kernel [*kernel_size, C, F]`, `bias [F]`),
  initialisation and values as `flax.linen.Conv`; only a 3x3 SAME stride-1
  convolution's kernel gradient on CPU is computed differently (`conv3x3`).
  """

  conv_general_dilated: ConvGeneralDilatedT | None = conv_general_dilated


def max_pool(x: Array, size: int) -> Array:
  """Max pooling over `size x size` windows with stride `size` (VALID): `[N, H, W, C] -> [N, H // size, W // size, C]`.

  On CPU, the maximum of the `size**2` strided slices (an elementwise
  gradient); elsewhere `nn.max_pool(x, (size, size), strides=(size, size))`.
  The values are equal. The gradients are equal except where a window's
  maximum is attained more than once: `nn.max_pool` gives the whole gradient
  to one of the tied inputs, this to several (their shares adding up to it).
  In cifar_cnn ties are the zeros of a ReLU, whose own gradient is zero there,
  so the parameters' gradients do not change.
  """
  if not _on_cpu():
    return nn.max_pool(x, (size, size), strides=(size, size))
  h, w = (x.shape[-3] // size) * size, (x.shape[-2] // size) * size
  x = x[..., :h, :w, :]
  rows = _maximum_of(x[..., i::size, :, :] for i in range(size))
  return _maximum_of(rows[..., j::size, :] for j in range(size))


def _maximum_of(arrays) -> Array:
  arrays = list(arrays)
  result = arrays[0]
  for a in arrays[1:]:
    result = jnp.maximum(result, a)
  return result
