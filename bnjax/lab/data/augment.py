"""On-device augmentation, pure and jittable: runs inside the training step, on whole batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def augment_cifar(key: jax.Array, images: jax.Array, *, padding: int = 4,
                  fill: float | tuple[float, ...] = 0.0) -> jax.Array:
  """Random crop after padding, then random horizontal flip, drawn independently per image.

  torchvision's `RandomCrop(32, padding=4)` + `RandomHorizontalFlip()`: each image is padded with
  `padding` pixels of the constant `fill` on every side (a constant pad, not a reflection), cropped
  back to H x W at a uniform offset in [0, 2 * padding] on each axis, and mirrored left-right with
  probability 1/2. torchvision pads the raw pixels with black; on scaled images pass
  `fill=dataset.preprocessing.zero_pixel` to do the same. Pure and jittable; vmap over a leading
  axis (with one key per slice) for more batch dimensions.

  Args:
    key: a PRNG key; the same key gives the same crops and flips.
    images: [N, H, W, C].
    padding: pixels added on each side before cropping.
    fill: the padding's value, a scalar or one per channel [C].

  Returns:
    [N, H, W, C], the dtype of `images`.
  """
  n, h, w, c = images.shape
  fill = jnp.broadcast_to(jnp.asarray(fill, images.dtype), (c,))
  padded = jnp.broadcast_to(fill, (n, h + 2 * padding, w + 2 * padding, c))
  padded = padded.at[:, padding:padding + h, padding:padding + w].set(images)
  crop_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * padding + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (n,))

  def crop_flip(image: jax.Array, offset: jax.Array, flip: jax.Array) -> jax.Array:
    crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(crop_flip)(padded, offsets, flips)
