"""Image classification data as whole arrays: MNIST, Fashion-MNIST and CIFAR-10.

    ds = bnjax.lab.data.load('cifar10', scaling='standardize', validation=0.3, data_dir=...)
    ds.train_images  # float32 [35000, 32, 32, 3] on the default device

`load` reads a data set (local files in their canonical formats, else TFDS), splits off validation,
scales the pixels and puts every split on the accelerator in one piece. Nothing here is an
iterator: shuffling and batching happen on device inside the jitted training (as in airbench), and
`augment_cifar` is the on-device augmentation.

- `formats`: one reader per file format (IDX, Keras npz, CIFAR-10 pickles, TFDS); `DataError`.
- `sources`: the registry (`spec`), the search for local files, and `read` (files or TFDS).
- `prepare`: the validation split, the scaling, `Dataset`, and placement on device.
- `augment`: `augment_cifar`, random crop and flip on device.
- `corruptions`: CIFAR-10-C and MNIST-C test sets generated on device (or read from TFDS).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from bnjax.lab import corruption_table
from bnjax.lab.data import corruptions
from bnjax.lab.data.augment import augment_cifar
from bnjax.lab.data.formats import (
    DataError,
    DataNotFoundError,
    Raw,
    read_cifar,
    read_idx,
    read_idx_folder,
    read_keras_npz,
    read_tfds,
)
from bnjax.lab.data.prepare import (
    Dataset,
    Preprocessing,
    channel_stats,
    place,
    prepare,
    scale_images,
    split_indices,
)
from bnjax.lab.data.sources import (
    ENV_DATA_DIR,
    SPECS,
    DatasetSpec,
    LocalFiles,
    find_local_files,
    read,
    search_dirs,
    spec,
)

__all__ = [
    'DataError',
    'DataNotFoundError',
    'Dataset',
    'DatasetSpec',
    'ENV_DATA_DIR',
    'LocalFiles',
    'Preprocessing',
    'Raw',
    'SPECS',
    'augment_cifar',
    'channel_stats',
    'find_local_files',
    'load',
    'place',
    'prepare',
    'read',
    'read_cifar',
    'read_idx',
    'read_idx_folder',
    'read_keras_npz',
    'read_tfds',
    'scale_images',
    'search_dirs',
    'spec',
    'split_indices',
]


def load(name: str, *, source: str = 'auto', data_dir: str | os.PathLike | None = None,
         scaling: str = 'unit', validation: str | float = 'test', validation_seed: int = 777,
         put: Callable[[np.ndarray], Any] | None = jax.device_put, corruption: str | None = None,
         severity: int = 5, corruption_seed: int = 0) -> Dataset:
  """Loads a data set's train, validation and test splits as whole arrays on the accelerator.

  The MNIST study: `load("mnist")` (p / 255, the test split as validation). The CIFAR-10 study:
  `load("cifar10", scaling="standardize", validation=0.3, validation_seed=777)`.

  Args:
    name: "mnist", "fashion_mnist" or "cifar10" (see `SPECS`); or "mnist_corrupted" /
      "cifar10_corrupted": the clean train split and the test split under `corruption` at `severity`
      (`bnjax.lab.data.corruptions.read_corrupted`; generated with `corruption_seed` unless source="tfds").
    source: "auto" (local files when found, else TFDS), "files" or "tfds"; see `read`.
    data_dir: folder searched first for local files, and TFDS's data_dir.
    scaling: "unit" (p / 255), "standardize" (per channel with the training part's mean and std) or
      "none" (the uint8 pixels, to scale on device); see `Preprocessing`.
    validation: "test" (validation is the test split) or a fraction in (0, 1) of train held out,
      never used for statistics or training; split as scikit-learn's train_test_split.
    validation_seed: seed of that split.
    put: places each array (default: on the default device); e.g. a `jax.device_put` with a
      sharding. None keeps numpy arrays.

  Returns:
    `Dataset`: images [N, H, W, C] float32 (uint8 for "none"), labels int32 [N].
  """
  if corruption_table.is_corrupted(name):
    raw = corruptions.read_corrupted(name, corruption, severity, seed=corruption_seed, source=source,
                                     data_dir=data_dir)
    name = corruption_table.CLEAN[name]
  else:
    raw = read(name, source=source, data_dir=data_dir)
  dataset = prepare(raw, spec(name), scaling=scaling,
                    validation=validation, validation_seed=validation_seed)
  return dataset if put is None else place(dataset, put)

