"""Readers of the canonical file formats: bytes in, checked uint8 images and int32 labels out.

One reader per format: `read_idx` and `read_idx_folder` (MNIST, Fashion-MNIST), `read_keras_npz`
(Keras's cached `mnist.npz`), `read_cifar` (the CIFAR-10 pickles, as a folder or the tar.gz) and
`read_tfds` (TFDS without TensorFlow). Each checks what it reads: a truncated or corrupt file raises
`DataError` naming the file and the problem, never a partial data set.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np


class DataError(ValueError):
  """A data file is corrupt or inconsistent; the message names the file and the problem."""


class DataNotFoundError(DataError):
  """No source could provide the data set; the message says where we looked and how to fix it."""


# IDX file stems by role; each may also end in `.gz`.
IDX_FILES = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
CIFAR_FOLDER = 'cifar-10-batches-py'
CIFAR_ARCHIVE = 'cifar-10-python.tar.gz'
CIFAR_TRAIN_BATCHES = tuple(f'data_batch_{i}' for i in range(1, 6))
CIFAR_TEST_BATCH = 'test_batch'
KERAS_NPZ_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')


class Raw(NamedTuple):
  """A data set as stored: images uint8 [N, H, W, C], labels int32 [N]; `source` says from where."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  source: str


_IDX_DTYPES = {0x08: np.dtype('u1'), 0x09: np.dtype('i1'), 0x0B: np.dtype('>i2'),
               0x0C: np.dtype('>i4'), 0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}


def _read_bytes(path: Path) -> bytes:
  """The file's bytes, gunzipped when its name ends in `.gz`."""
  try:
    data = path.read_bytes()
  except PermissionError as err:
    raise DataError(f'{path}: permission denied: make the file readable (chmod a+r) or use another --data_dir.') from err
  except OSError as err:
    raise DataError(f'{path}: cannot read it ({type(err).__name__}: {err}).') from err
  try:
    return gzip.decompress(data) if path.suffix == '.gz' else data
  except (OSError, EOFError, zlib.error) as err:
    raise DataError(f'{path}: cannot read it ({type(err).__name__}: {err}). The file is truncated '
                    'or corrupt: download it again.') from err


def read_idx(path: str | os.PathLike, *, magic: int | None = None) -> np.ndarray:
  """Reads one IDX file (gunzipped first when its name ends in `.gz`).

  Args:
    path: the file.
    magic: when given, the magic number the file must have (e.g. 0x803 for MNIST images).

  Returns:
    [d0, d1, ...] as the header says, of the stored type (uint8 for MNIST); a read-only view.
  """
  path = Path(path)
  data = _read_bytes(path)
  if len(data) < 4 or data[:2] != b'\0\0' or data[2] not in _IDX_DTYPES:
    raise DataError(f'{path}: not an IDX file (first bytes {data[:4].hex()}; expected 0000 then a '
                    'type code and the number of dimensions, e.g. 00000803).')
  found_magic = int.from_bytes(data[:4], 'big')
  if magic is not None and found_magic != magic:
    raise DataError(f'{path}: IDX magic 0x{found_magic:08x}, expected 0x{magic:08x}. Is this the '
                    'right file?')
  dtype, ndim = _IDX_DTYPES[data[2]], data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DataError(f'{path}: truncated IDX header ({len(data)} bytes, expected {header}).')
  dims = tuple(int(d) for d in np.frombuffer(data, '>u4', count=ndim, offset=4))
  expected = math.prod(dims) * dtype.itemsize
  if len(data) - header != expected:
    raise DataError(f'{path}: the header says shape {dims} ({expected} bytes of data) but the file '
                    f'holds {len(data) - header}. The file is truncated or corrupt: download it '
                    'again.')
  return np.frombuffer(data, dtype, offset=header).reshape(dims)


def _checked_labels(labels: Any, num_images: int, num_classes: int, where: str) -> np.ndarray:
  """`labels` as int32 [num_images], after checking their number and range."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'{where}: labels must be integers of shape [N], found {labels.dtype} '
                    f'{list(labels.shape)}.')
  if len(labels) != num_images:
    raise DataError(f'{where}: {len(labels)} labels for {num_images} images; they must match '
                    'one to one. A file is truncated or from another data set.')
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(f'{where}: labels must be in [0, {num_classes}), found values from '
                    f'{labels.min()} to {labels.max()}.')
  return labels.astype(np.int32)


def idx_path(folder: Path, stem: str) -> Path | None:
  """`folder/stem.gz` or `folder/stem`, whichever exists (the gzipped one first), else None."""
  for path in (folder / f'{stem}.gz', folder / stem):
    if path.is_file():
      return path
  return None


def read_idx_folder(folder: str | os.PathLike, *, num_classes: int = 10) -> Raw:
  """Reads the four IDX files of MNIST or Fashion-MNIST from `folder` (see `IDX_FILES`).

  Returns:
    images uint8 [N, H, W, 1], labels int32 [N].
  """
  folder = Path(folder)
  paths = {role: idx_path(folder, stem) for role, stem in IDX_FILES.items()}
  missing = [f'{IDX_FILES[role]}[.gz]' for role, path in paths.items() if path is None]
  if missing:
    raise DataError(f"{folder}: incomplete IDX data set, missing {', '.join(missing)}.")
  arrays = []
  for split in ('train', 'test'):
    images_path, labels_path = paths[f'{split}_images'], paths[f'{split}_labels']
    images = read_idx(images_path, magic=IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, magic=IDX_LABELS_MAGIC)
    arrays += [images[..., None],
               _checked_labels(labels, len(images), num_classes, f'{labels_path} ({images_path})')]
  return Raw(*arrays, source=f'idx:{folder}')


def read_keras_npz(path: str | os.PathLike, *, num_classes: int = 10) -> Raw:
  """Reads Keras's cached `mnist.npz` (arrays `x_train`, `y_train`, `x_test`, `y_test`).

  Returns:
    images uint8 [N, 28, 28, 1], labels int32 [N].
  """
  path = Path(path)
  try:
    with np.load(path, allow_pickle=False) as npz:
      x_train, y_train, x_test, y_test = (npz[k] for k in KERAS_NPZ_KEYS)
  except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as err:
    raise DataError(f'{path}: not a readable Keras mnist.npz ({type(err).__name__}: {err}); '
                    f"expected uint8 arrays {', '.join(KERAS_NPZ_KEYS)}. Download it again."
                    ) from err
  arrays = []
  for key, images, labels in (('train', x_train, y_train), ('test', x_test, y_test)):
    if images.dtype != np.uint8 or images.ndim != 3:
      raise DataError(f'{path}: x_{key} must be uint8 [N, H, W], found {images.dtype} '
                      f'{list(images.shape)}.')
    arrays += [images[..., None], _checked_labels(labels, len(images), num_classes,
                                                  f'{path} (y_{key})')]
  return Raw(*arrays, source=f'keras_npz:{path}')


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles dicts, lists and numpy arrays only: a data file must not run code."""

  _ALLOWED = {('_codecs', 'encode'), ('numpy', 'ndarray'), ('numpy', 'dtype'),
              ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
              ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer')}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'refusing to load {module}.{name}: a CIFAR-10 batch holds '
                                   'only a dict of numpy arrays and lists')
    return super().find_class(module, name)


def _read_cifar_batch(file: IO[bytes], where: str,
                      num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """One CIFAR-10 batch pickle: images uint8 [n, 32, 32, 3] and labels int32 [n]."""
  try:
    batch = _NumpyOnlyUnpickler(file, encoding='bytes').load()
  except Exception as err:  # noqa: BLE001 -- corrupt bytes can make pickle raise almost anything
    raise DataError(f'{where}: not a readable CIFAR-10 batch pickle ({type(err).__name__}: {err}). '
                    'The file is truncated or corrupt: download it again.') from err
  if not isinstance(batch, dict):
    raise DataError(f"{where}: expected a dict with 'data' and 'labels', found "
                    f'{type(batch).__name__}.')
  batch = {k.decode('latin1') if isinstance(k, bytes) else k: v for k, v in batch.items()}
  if 'data' not in batch or 'labels' not in batch:
    raise DataError(f"{where}: expected keys 'data' and 'labels', found {sorted(batch)}.")
  data = np.asarray(batch['data'])
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise DataError(f"{where}: 'data' must be uint8 [n, 3072] (R, G, B planes of 32x32), found "
                    f'{data.dtype} {list(data.shape)}.')
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, _checked_labels(batch['labels'], len(images), num_classes, where)


def _read_cifar_batches(open_batch: Callable[[str], IO[bytes]], where: str,
                        num_classes: int) -> Raw:
  """Reads the five train batches and the test batch, each opened by `open_batch(name)`."""
  splits = []
  for names in (CIFAR_TRAIN_BATCHES, (CIFAR_TEST_BATCH,)):
    batches = []
    for name in names:
      with open_batch(name) as file:
        batches.append(_read_cifar_batch(file, f'{where}/{name}', num_classes))
    # np.concatenate also makes the transposed [n, 32, 32, 3] views contiguous.
    splits += [np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])]
  return Raw(*splits, source=where)


def read_cifar(path: str | os.PathLike, *, num_classes: int = 10) -> Raw:
  """Reads CIFAR-10 from the `cifar-10-batches-py` folder or the `cifar-10-python.tar.gz` archive.

  Returns:
    images uint8 [N, 32, 32, 3] (NHWC, from the R, G, B planes of each row), labels int32 [N].
  """
  path = Path(path)
  if path.is_dir():
    def open_file(name: str) -> IO[bytes]:
      if not (path / name).is_file():
        raise DataError(f'{path}: incomplete CIFAR-10 folder, missing {name} (expected '
                        f"{', '.join(CIFAR_TRAIN_BATCHES)} and {CIFAR_TEST_BATCH}).")
      return open(path / name, 'rb')

    raw = _read_cifar_batches(open_file, str(path), num_classes)
    return raw._replace(source=f'cifar_folder:{path}')
  archive = io.BytesIO(_read_bytes(path))  # gunzipped whole: the gzip CRC checks every byte
  try:
    with tarfile.open(fileobj=archive, mode='r:') as tar:
      members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

      def open_member(name: str) -> IO[bytes]:
        if name not in members:
          raise DataError(f'{path}: the archive lacks {name} (expected {CIFAR_FOLDER}/ with '
                          f"{', '.join(CIFAR_TRAIN_BATCHES)} and {CIFAR_TEST_BATCH}).")
        return tar.extractfile(members[name])

      raw = _read_cifar_batches(open_member, str(path), num_classes)
  except tarfile.TarError as err:
    raise DataError(f'{path}: not a readable tar.gz archive ({type(err).__name__}: {err}). The '
                    'file is truncated or corrupt: download it again.') from err
  return raw._replace(source=f'cifar_tar:{path}')


def read_tfds(tfds_name: str, *, data_dir: str | os.PathLike | None = None,
              num_classes: int = 10) -> Raw:
  """Reads the train and test splits through TFDS without TensorFlow (`tfds.data_source`).

  Reads a copy prepared in the array_record format in `data_dir` (TFDS's default when None). If
  there is none, TFDS downloads and prepares one, which needs a network and TensorFlow (the TFDS
  builders of these data sets use `tf.io.gfile`); reading needs neither. Copies prepared by
  `tfds.load` (tfrecord) are not readable this way.

  Raises:
    DataNotFoundError: TFDS could not provide the data set (no download, no prepared copy).
  """
  import tensorflow_datasets as tfds  # slow to import: only this path needs it

  where = f"tfds:{tfds_name}@{data_dir or 'default data_dir'}"
  try:
    sources = tfds.data_source(tfds_name, split=['train', 'test'], data_dir=data_dir)
    examples = [[source[i] for i in range(len(source))] for source in sources]
  except Exception as err:  # noqa: BLE001 -- TFDS fails in many ways (network, format, imports)
    raise DataNotFoundError(f'tfds.data_source({tfds_name!r}, data_dir={data_dir!r}) failed: '
                            f'{type(err).__name__}: {err}') from err
  arrays = []
  for split, split_examples in zip(('train', 'test'), examples):
    if not split_examples:
      raise DataError(f'{where}: the {split} split is empty.')
    images = np.stack([ex['image'] for ex in split_examples])
    labels = [ex['label'] for ex in split_examples]
    arrays += [images, _checked_labels(labels, len(images), num_classes, f'{where} ({split})')]
  return Raw(*arrays, source=where)

