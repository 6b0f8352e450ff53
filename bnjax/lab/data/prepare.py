"""Preparation on the host, in numpy: the validation split and the pixel scaling; then placement.

`prepare` turns a data set as stored (`Raw`, uint8) into a `Dataset` of whole splits; `place` puts
its arrays on the accelerator. The held-out validation part is never used for statistics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from bnjax.lab.data.formats import Raw
from bnjax.lab.data.sources import DatasetSpec


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How the images were made from the stored uint8 pixels p, so that anyone can redo it.

  Attributes:
    scaling: "unit": p / 255; "standardize": (p / 255 - mean) / std per channel, with the mean and
      (population) std of the training images after the validation split; "none": p as uint8.
    mean, std: per channel, in units of p / 255 (zeros and ones for "unit"; None for "none").
    validation: "test" (validation is the test split) or the fraction of train held out.
    validation_seed: the seed of that split (None for "test").
  """

  scaling: str
  mean: tuple[float, ...] | None
  std: tuple[float, ...] | None
  validation: str | float
  validation_seed: int | None

  @property
  def zero_pixel(self) -> tuple[float, ...] | float:
    """What a black pixel (p = 0) becomes: `augment_cifar`'s `fill` that pads with black."""
    if self.mean is None:
      return 0.0
    return tuple(-m / s for m, s in zip(self.mean, self.std))


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """The splits of a data set as whole arrays: images [N, H, W, C], labels int32 [N].

  Images are float32, or uint8 when `preprocessing.scaling == "none"`. The arrays are jax arrays on
  the device `load` put them on (numpy with `put=None`). A pytree: the arrays are its leaves,
  `name`, `num_classes`, `source` and `preprocessing` static metadata, so a whole `Dataset` can be
  passed to a jitted function. With `validation="test"`, `val_*` are the `test_*` arrays themselves.
  """

  train_images: Any
  train_labels: Any
  val_images: Any
  val_labels: Any
  test_images: Any
  test_labels: Any
  name: str
  num_classes: int
  source: str
  preprocessing: Preprocessing


_ARRAY_FIELDS = ('train_images', 'train_labels', 'val_images', 'val_labels', 'test_images',
                 'test_labels')
jax.tree_util.register_dataclass(Dataset, data_fields=list(_ARRAY_FIELDS),
                                 meta_fields=['name', 'num_classes', 'source', 'preprocessing'])


def split_indices(num_examples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices (train [n - k], validation [k]) holding out k = ceil(fraction * n) examples.

  The same split as scikit-learn's `train_test_split(x, test_size=fraction, random_state=seed)`
  (without stratify): validation is the first k of `RandomState(seed).permutation(n)`, train the
  rest, both in that permuted order.
  """
  if not 0 < fraction < 1:
    raise ValueError(f"validation fraction {fraction} must be in (0, 1), or pass 'test'.")
  num_val = math.ceil(fraction * num_examples)
  if not 0 < num_val < num_examples:
    raise ValueError(f'validation fraction {fraction} of {num_examples} examples leaves an empty '
                     'split; use a fraction that keeps at least one example on each side.')
  permutation = np.random.RandomState(seed).permutation(num_examples)
  return permutation[num_val:], permutation[:num_val]


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and population std of uint8 images [N, H, W, C], in units of pixel / 255.

  Exact: computed in float64 from the 256-bin histogram of each channel.

  Returns:
    mean [C], std [C], float64.
  """
  values = np.arange(256) / 255
  means, stds = [], []
  for c in range(images.shape[-1]):
    counts = np.bincount(images[..., c].ravel(), minlength=256)
    mean = counts @ values / counts.sum()
    means.append(mean)
    stds.append(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))
  return np.array(means), np.array(stds)


def scale_images(images: np.ndarray, mean: Any, std: Any) -> np.ndarray:
  """(images / 255 - mean) / std in float32, per channel: torchvision's ToTensor then Normalize.

  images: uint8 [N, H, W, C]; mean, std: [C] or scalars. Returns float32 [N, H, W, C].
  """
  out = images.astype(np.float32)
  out /= np.float32(255)
  out -= np.asarray(mean, np.float32)
  out /= np.asarray(std, np.float32)
  return out


def prepare(raw: Raw, spec_: DatasetSpec, *, scaling: str = 'unit',
            validation: str | float = 'test', validation_seed: int = 777) -> Dataset:
  """Splits off validation and scales the pixels of `raw`; numpy in, numpy out (see `load`)."""
  if scaling not in ('unit', 'standardize', 'none'):
    raise ValueError(f"Unknown scaling {scaling!r}: expected 'unit', 'standardize' or 'none'.")
  if validation == 'test':
    train_images, train_labels = raw.train_images, raw.train_labels
    val_images, val_labels = raw.test_images, raw.test_labels
    seed = None
  elif isinstance(validation, (float, int)) and not isinstance(validation, bool):
    train_idx, val_idx = split_indices(len(raw.train_labels), validation, validation_seed)
    train_images, train_labels = raw.train_images[train_idx], raw.train_labels[train_idx]
    val_images, val_labels = raw.train_images[val_idx], raw.train_labels[val_idx]
    seed = validation_seed
  else:
    raise ValueError(f"validation={validation!r}: expected 'test' or a fraction of train in "
                     '(0, 1).')

  num_channels = spec_.image_shape[-1]
  if scaling == 'standardize':
    mean, std = channel_stats(train_images)  # the training part only: validation stays unseen
  elif scaling == 'unit':
    mean, std = np.zeros(num_channels), np.ones(num_channels)
  else:
    mean = std = None
  scale = (lambda images: images) if mean is None else (
      lambda images: scale_images(images, mean, std))
  test_images = scale(raw.test_images)
  val_images = test_images if validation == 'test' else scale(val_images)
  as_tuple = lambda values: None if values is None else tuple(map(float, values))
  preprocessing = Preprocessing(scaling, as_tuple(mean), as_tuple(std), validation, seed)
  return Dataset(scale(train_images), train_labels, val_images, val_labels, test_images,
                 raw.test_labels, spec_.name, spec_.num_classes, raw.source, preprocessing)


def place(dataset: Dataset, put: Callable[[np.ndarray], Any] = jax.device_put) -> Dataset:
  """`dataset` with every array passed through `put` once (shared arrays stay shared)."""
  placed = {}

  def put_once(array: np.ndarray) -> Any:
    if id(array) not in placed:
      placed[id(array)] = put(array)
    return placed[id(array)]

  return jax.tree.map(put_once, dataset)

