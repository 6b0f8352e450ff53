"""Data the tests write: the canonical IDX and CIFAR-10 formats, and a small learnable MNIST look-alike."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from bnjax.lab import data
from bnjax.lab.data import formats


def write_idx(path: Path, array: np.ndarray) -> Path:
  """IDX: 0x00 0x00, type code 0x08 (uint8), ndim, big-endian uint32 dims, then the bytes."""
  content = bytes([0, 0, 0x08, array.ndim]) + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  content += np.ascontiguousarray(array, np.uint8).tobytes()
  path.write_bytes(gzip.compress(content) if path.suffix == '.gz' else content)
  return path


def write_idx_folder(folder: Path, raw: data.Raw, gz: bool = True) -> Path:
  """The four MNIST IDX files of `raw` (images [N, 28, 28, 1] or [N, 28, 28]) in `folder`."""
  folder.mkdir(parents=True, exist_ok=True)
  suffix = '.gz' if gz else ''
  for role, stem in formats.IDX_FILES.items():
    array = getattr(raw, role)
    write_idx(folder / (stem + suffix), array[..., 0] if array.ndim == 4 else array)
  return folder


def learnable_digits(seed: int = 0, num_train: int = 1200, num_test: int = 400) -> data.Raw:
  """MNIST-shaped uint8 images whose class is learnable but not trivially: a random binary
  pattern per class (10% of the pixels on) with 30% of the pixels flipped.

  `mnist_mlp` with BN reaches about 80% on it in two epochs, and its margins are
  small enough that the moving-statistics bug shows (about 40%).
  """
  rng = np.random.default_rng(seed)
  patterns = rng.random((10, 28, 28)) < 0.1

  def make(n):
    labels = rng.integers(0, 10, n).astype(np.int32)
    flips = rng.random((n, 28, 28)) < 0.3
    return np.where(patterns[labels] ^ flips, 255, 0).astype(np.uint8)[..., None], labels

  train_images, train_labels = make(num_train)
  test_images, test_labels = make(num_test)
  return data.Raw(train_images, train_labels, test_images, test_labels, '')


def write_learnable_mnist(folder: Path, **kwargs) -> Path:
  """`learnable_digits` written as MNIST's four IDX .gz files in `folder/mnist`."""
  return write_idx_folder(Path(folder) / 'mnist', learnable_digits(**kwargs))


def cifar_batch(images, labels, protocol=2, byte_keys=True):
  """A CIFAR-10 batch pickle: rows of 3072 bytes, the R, G then B 32x32 planes."""
  rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  batch = {'data': rows, 'labels': [int(y) for y in labels], 'batch_label': 'fake',
           'filenames': [f'{i}.png' for i in range(len(images))]}
  if byte_keys:
    batch = {k.encode(): v for k, v in batch.items()}
  return pickle.dumps(batch, protocol=protocol)


def write_cifar_folder(folder, raw, protocol=2):
  """Splits train into the five data_batch_i files (as in the original, equal parts)."""
  folder.mkdir(parents=True, exist_ok=True)
  parts = np.array_split(np.arange(len(raw.train_labels)), 5)
  for name, idx in zip(formats.CIFAR_TRAIN_BATCHES, parts):
    (folder / name).write_bytes(cifar_batch(raw.train_images[idx], raw.train_labels[idx], protocol))
  (folder / 'test_batch').write_bytes(cifar_batch(raw.test_images, raw.test_labels, protocol))
  (folder / 'batches.meta').write_bytes(pickle.dumps({b'label_names': [b'airplane'] * 10}))
  return folder
