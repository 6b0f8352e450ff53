"""Where a data set comes from: the registry that names each data set, local files, or TFDS.

`read(name)` returns a data set as stored (`Raw`). With `source="auto"` it takes the first local
files found in `data_dir`, then `$BNJAX_DATA_DIR`, then well-known places (`~/.keras/datasets`;
`/usr/share/datasets/fashion-mnist` from Debian's `dataset-fashion-mnist`), each of which may hold
the files themselves or a folder named for the data set (`mnist/`, `fashion-mnist/`, `cifar10/`,
...); else TFDS in `data_dir`. Reading the real files takes well under a second, a whole `load`
about 1 s (MNIST) and 2 s (CIFAR-10) on two CPU cores, so nothing is cached.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import NamedTuple

from bnjax.lab.data.formats import (
    CIFAR_ARCHIVE,
    CIFAR_FOLDER,
    CIFAR_TEST_BATCH,
    CIFAR_TRAIN_BATCHES,
    IDX_FILES,
    DataError,
    DataNotFoundError,
    Raw,
    idx_path,
    read_cifar,
    read_idx_folder,
    read_keras_npz,
    read_tfds,
)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What is known about a data set without loading it.

  Attributes:
    name: the name `load` takes.
    image_shape: (H, W, C) of one image.
    num_classes: labels are integers in [0, num_classes).
    num_train, num_test: sizes of the canonical splits (before any validation split).
    file_format: "idx" (MNIST-style IDX files) or "cifar" (CIFAR-10 python pickles).
    folder_names: sub-folders of a data dir that may hold the files.
    well_known_dirs: places searched after `data_dir` and `$BNJAX_DATA_DIR` (`~` expanded).
    keras_npz: file name of Keras's cached copy, if Keras caches this data set as one `.npz`.
    tfds_name: the TFDS name.
  """

  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  num_train: int
  num_test: int
  file_format: str
  folder_names: tuple[str, ...]
  well_known_dirs: tuple[str, ...]
  keras_npz: str | None
  tfds_name: str


SPECS: dict[str, DatasetSpec] = {
    'mnist': DatasetSpec(
        'mnist', (28, 28, 1), 10, 60_000, 10_000, 'idx', ('mnist',),
        ('~/.keras/datasets',), 'mnist.npz', 'mnist'),
    'fashion_mnist': DatasetSpec(
        'fashion_mnist', (28, 28, 1), 10, 60_000, 10_000, 'idx',
        ('fashion_mnist', 'fashion-mnist'),
        ('/usr/share/datasets/fashion-mnist', '~/.keras/datasets'), None, 'fashion_mnist'),
    'cifar10': DatasetSpec(
        'cifar10', (32, 32, 3), 10, 50_000, 10_000, 'cifar',
        # Keras 3 extracts the archive into `cifar-10-batches-py-target/`.
        ('cifar10', 'cifar-10', 'cifar-10-batches-py-target'),
        ('~/.keras/datasets',), None, 'cifar10'),
}
ENV_DATA_DIR = 'BNJAX_DATA_DIR'


def spec(name: str) -> DatasetSpec:
  """The registry entry of `name` (see `SPECS`)."""
  if name not in SPECS:
    raise ValueError(f'Unknown data set {name!r}: expected one of {sorted(SPECS)}.')
  return SPECS[name]


class LocalFiles(NamedTuple):
  """Files found for a data set: `kind` is "idx", "keras_npz", "cifar_folder" or "cifar_tar"."""

  kind: str
  path: Path


def search_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
  """The folders searched for `name`'s files, in order.

  `data_dir`, then `$BNJAX_DATA_DIR`, then the spec's well-known places; each followed by its
  sub-folders named in `spec(name).folder_names`.
  """
  spec_ = spec(name)
  roots = [d for d in (data_dir, os.environ.get(ENV_DATA_DIR)) if d]
  roots += [Path(d).expanduser() for d in spec_.well_known_dirs]
  folders = []
  for root in map(Path, roots):
    for folder in (root, *(root / sub for sub in spec_.folder_names)):
      if folder not in folders:
        folders.append(folder)
  return folders


def _find_in_folder(spec_: DatasetSpec, folder: Path) -> LocalFiles | None:
  """The files of `spec_` in `folder` itself, if any; a partial IDX set raises `DataError`."""
  if spec_.file_format == 'idx':
    if any(idx_path(folder, stem) for stem in IDX_FILES.values()):
      # Even one IDX file claims the folder: read_idx_folder then names the missing ones.
      return LocalFiles('idx', folder)
    if spec_.keras_npz and (folder / spec_.keras_npz).is_file():
      return LocalFiles('keras_npz', folder / spec_.keras_npz)
    return None
  for candidate in (folder, folder / CIFAR_FOLDER):
    if any((candidate / b).is_file() for b in (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH)):
      return LocalFiles('cifar_folder', candidate)
  if (folder / CIFAR_ARCHIVE).is_file():
    return LocalFiles('cifar_tar', folder / CIFAR_ARCHIVE)
  return None


def find_local_files(name: str, data_dir: str | os.PathLike | None = None) -> LocalFiles | None:
  """The first local copy of `name` in `search_dirs(name, data_dir)`, or None."""
  spec_ = spec(name)
  for folder in search_dirs(name, data_dir):
    found = _find_in_folder(spec_, folder)
    if found:
      return found
  return None


def _read_local(found: LocalFiles, spec_: DatasetSpec) -> Raw:
  if found.kind == 'idx':
    return read_idx_folder(found.path, num_classes=spec_.num_classes)
  if found.kind == 'keras_npz':
    return read_keras_npz(found.path, num_classes=spec_.num_classes)
  return read_cifar(found.path, num_classes=spec_.num_classes)


def _expected_files(spec_: DatasetSpec) -> str:
  if spec_.file_format == 'idx':
    files = ' + '.join(f'{stem}[.gz]' for stem in IDX_FILES.values())
    return files + (f', or {spec_.keras_npz}' if spec_.keras_npz else '')
  return f'the {CIFAR_FOLDER}/ folder (data_batch_1..5, test_batch) or {CIFAR_ARCHIVE}'


def _not_found_message(spec_: DatasetSpec, searched: list[Path], tfds_error: str | None,
                       data_dir: str | os.PathLike | None) -> str:
  lines = [f'No data for {spec_.name!r}.']
  if searched:
    lines += [f'Looked for {_expected_files(spec_)} in:', *(f'  {d}' for d in searched)]
  else:
    lines.append(f"Did not look for local files ({_expected_files(spec_)}): source='tfds'.")
  if tfds_error:
    lines.append(f'TFDS: {tfds_error}')
  lines += [
      'To fix, either:',
      f'  - put those files in a folder and pass it as data_dir (the --data_dir flag) or set '
      f'{ENV_DATA_DIR}; the folder may also hold them in a sub-folder '
      f"({', '.join(f'{sub}/' for sub in spec_.folder_names)});",
      '  - or prepare it once with TFDS where it can download and TensorFlow is installed (TFDS '
      'needs TensorFlow to prepare a data set, not to read it): python -c "import '
      f"tensorflow_datasets as tfds; tfds.data_source('{spec_.tfds_name}', "
      f"data_dir='{data_dir or 'DIR'}')\"; then pass that data_dir with source='tfds' or 'auto'.",
  ]
  return '\n'.join(lines)


def read(name: str, *, source: str = 'auto', data_dir: str | os.PathLike | None = None) -> Raw:
  """Reads `name` as stored, without splitting or scaling.

  Args:
    name: a key of `SPECS`.
    source: "files" (local files only), "tfds" (TFDS only) or "auto" (local files when found, else
      TFDS).
    data_dir: searched first for local files (see `search_dirs`); TFDS's data_dir.

  Returns:
    `Raw`: images uint8 [N, H, W, C] and labels int32 [N] of the train and test splits.

  Raises:
    DataNotFoundError: no source has the data; the message lists where we looked and how to fix it.
    DataError: a file is corrupt or inconsistent.
  """
  spec_ = spec(name)
  if source not in ('auto', 'files', 'tfds'):
    raise ValueError(f"Unknown source {source!r}: expected 'auto', 'files' or 'tfds'.")
  found = None if source == 'tfds' else find_local_files(name, data_dir)
  searched = [] if source == 'tfds' or found else search_dirs(name, data_dir)
  if found:
    raw = _read_local(found, spec_)
  elif source == 'files':
    raise DataNotFoundError(_not_found_message(spec_, searched, None, data_dir))
  else:
    try:
      raw = read_tfds(spec_.tfds_name, data_dir=data_dir, num_classes=spec_.num_classes)
    except DataNotFoundError as err:
      raise DataNotFoundError(_not_found_message(spec_, searched, str(err), data_dir)) from err
  for images in (raw.train_images, raw.test_images):
    if images.shape[1:] != spec_.image_shape:
      raise DataError(f'{raw.source}: images of shape {list(images.shape[1:])}, expected '
                      f'{list(spec_.image_shape)} for {name!r}. Is this another data set?')
  return raw

