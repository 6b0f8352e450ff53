"""Tests of bnjax.lab.data: small generated files in each format, their corruptions, TFDS under
tfds.testing.mock_data, preparation against numpy/scikit-learn references, on-device augmentation,
and (marked integration) the real data sets in ../shared/data."""

import gzip
import os
import pickle
import tarfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.lab import data
from bnjax.lab.data import formats

from fixtures import cifar_batch, write_cifar_folder, write_idx, write_idx_folder

SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
DEBIAN_FASHION_MNIST = Path('/usr/share/datasets/fashion-mnist')


@pytest.fixture(autouse=True)
def no_data_in_environment(monkeypatch, tmp_path):
  """No $BNJAX_DATA_DIR and an empty home (so no ~/.keras/datasets) unless a test sets them."""
  monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))


# --------------------------------------------------------------------------------------------------
# Writers of the canonical formats (the reference the readers must invert).


def fake_raw(seed, image_shape=(28, 28, 1), num_train=20, num_test=7):
  """Random uint8 images [N, H, W, C] and labels in [0, 10), as `data.Raw` arrays."""
  rng = np.random.default_rng(seed)
  images = lambda n: rng.integers(0, 256, (n, *image_shape), dtype=np.uint8)
  labels = lambda n: rng.integers(0, 10, n).astype(np.int32)
  return data.Raw(images(num_train), labels(num_train), images(num_test), labels(num_test), '')


def write_keras_npz(path, raw):
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, x_train=raw.train_images[..., 0], y_train=raw.train_labels.astype(np.uint8),
           x_test=raw.test_images[..., 0], y_test=raw.test_labels.astype(np.uint8))
  return path


def write_cifar_tar(path, batches_folder):
  with tarfile.open(path, 'w:gz') as tar:
    tar.add(batches_folder, arcname=formats.CIFAR_FOLDER)
  return path


def fake_cifar(seed=1):
  return fake_raw(seed, (32, 32, 3), num_train=15, num_test=4)


def assert_raw_equal(got, want):
  for field in ('train_images', 'train_labels', 'test_images', 'test_labels'):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    assert getattr(got, field).dtype == (np.uint8 if 'images' in field else np.int32), field


# --------------------------------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize('suffix', ['.gz', ''])
def test_read_idx_round_trips(tmp_path, suffix):
  images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
  got = data.read_idx(write_idx(tmp_path / f'images{suffix}', images), magic=0x803)
  np.testing.assert_array_equal(got, images)
  assert got.dtype == np.uint8


@pytest.mark.parametrize('gz', [True, False])
def test_read_idx_folder_round_trips(tmp_path, gz):
  raw = fake_raw(0)
  got = data.read_idx_folder(write_idx_folder(tmp_path, raw, gz=gz))
  assert_raw_equal(got, raw)
  assert got.source == f'idx:{tmp_path}'


def test_read_keras_npz_round_trips(tmp_path):
  raw = fake_raw(1)
  got = data.read_keras_npz(write_keras_npz(tmp_path / 'mnist.npz', raw))
  assert_raw_equal(got, raw)


@pytest.mark.parametrize('protocol,byte_keys', [(2, True), (pickle.HIGHEST_PROTOCOL, False)])
def test_read_cifar_folder_round_trips(tmp_path, protocol, byte_keys):
  raw = fake_cifar()
  folder = tmp_path / formats.CIFAR_FOLDER
  write_cifar_folder(folder, raw, protocol)
  if not byte_keys:  # a batch pickled from Python 3 with str keys reads too
    (folder / 'test_batch').write_bytes(
        cifar_batch(raw.test_images, raw.test_labels, protocol, byte_keys=False))
  assert_raw_equal(data.read_cifar(folder), raw)


def test_read_cifar_tar_round_trips(tmp_path):
  raw = fake_cifar()
  tar = write_cifar_tar(tmp_path / formats.CIFAR_ARCHIVE,
                        write_cifar_folder(tmp_path / 'batches', raw))
  got = data.read_cifar(tar)
  assert_raw_equal(got, raw)
  assert got.source == f'cifar_tar:{tar}'


def test_read_cifar_pixel_layout_is_rgb_planes(tmp_path):
  """By the format's definition, row bytes 0, 1024 and 2048 are pixel (0, 0)'s R, G and B."""
  rows = np.zeros((1, 3072), np.uint8)
  rows[0, [0, 1024, 2048, 1]] = [10, 20, 30, 40]
  batch = pickle.dumps({b'data': rows, b'labels': [3]})
  folder = tmp_path / 'b'
  folder.mkdir()
  for name in (*formats.CIFAR_TRAIN_BATCHES, formats.CIFAR_TEST_BATCH):
    (folder / name).write_bytes(batch)
  images = data.read_cifar(folder).test_images
  assert images[0, 0, 0].tolist() == [10, 20, 30]
  assert images[0, 0, 1].tolist() == [40, 0, 0]


# --------------------------------------------------------------------------------------------------
# Finding local files.


@pytest.mark.parametrize('layout', ['idx in data_dir', 'idx in data_dir/mnist', 'mnist.npz'])
def test_load_finds_mnist_in_data_dir(tmp_path, layout):
  raw = fake_raw(2)
  if layout == 'mnist.npz':
    write_keras_npz(tmp_path / 'mnist.npz', raw)
  else:
    write_idx_folder(tmp_path / 'mnist' if layout.endswith('/mnist') else tmp_path, raw)
  ds = data.load('mnist', source='files', data_dir=tmp_path, scaling='none', put=None)
  np.testing.assert_array_equal(ds.train_images, raw.train_images)
  np.testing.assert_array_equal(ds.test_labels, raw.test_labels)


@pytest.mark.parametrize('layout', [
    'cifar10/cifar-10-batches-py', 'cifar-10-batches-py', '.', 'tar', 'cifar10/tar'])
def test_load_finds_cifar_in_data_dir(tmp_path, layout):
  raw = fake_cifar(3)
  if layout.endswith('tar'):
    folder = tmp_path / layout.removesuffix('tar')
    folder.mkdir(parents=True, exist_ok=True)
    write_cifar_tar(folder / formats.CIFAR_ARCHIVE, write_cifar_folder(tmp_path / 'src', raw))
  else:
    write_cifar_folder(tmp_path / layout, raw)
  ds = data.load('cifar10', source='files', data_dir=tmp_path, scaling='none', put=None)
  np.testing.assert_array_equal(ds.train_images, raw.train_images)
  np.testing.assert_array_equal(ds.test_labels, raw.test_labels)


def test_search_order_data_dir_then_env_then_keras_cache(tmp_path, monkeypatch):
  home = Path(os.environ['HOME'])
  write_keras_npz(home / '.keras' / 'datasets' / 'mnist.npz', fake_raw(3))
  assert data.find_local_files('mnist').kind == 'keras_npz'
  env_dir = write_idx_folder(tmp_path / 'env' / 'mnist', fake_raw(4))
  monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / 'env'))
  assert data.find_local_files('mnist') == ('idx', env_dir)
  arg_dir = write_idx_folder(tmp_path / 'arg' / 'mnist', fake_raw(5))
  assert data.find_local_files('mnist', tmp_path / 'arg') == ('idx', arg_dir)
  assert data.search_dirs('mnist', tmp_path / 'arg')[:4] == [
      tmp_path / 'arg', arg_dir, tmp_path / 'env', env_dir]


def test_fashion_mnist_well_known_places():
  assert DEBIAN_FASHION_MNIST in data.search_dirs('fashion_mnist')
  assert Path('~/.keras/datasets/fashion-mnist').expanduser() in data.search_dirs('fashion_mnist')


def test_spec_without_loading():
  assert data.spec('cifar10').image_shape == (32, 32, 3)
  assert data.spec('mnist').num_classes == 10
  with pytest.raises(ValueError, match="Unknown data set 'imagenet'.*cifar10"):
    data.spec('imagenet')


# --------------------------------------------------------------------------------------------------
# Bad input: each corruption names the file and the problem.


def corrupt_gzip_garbage(path):
  path.write_bytes(b'this is not gzip at all')


def corrupt_gzip_truncated(path):
  path.write_bytes(path.read_bytes()[:-100])


def corrupt_wrong_magic(path):
  content = bytearray(gzip.decompress(path.read_bytes()))
  content[3] = 0x02
  path.write_bytes(gzip.compress(bytes(content)))


def corrupt_idx_body_short(path):
  path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-28]))


def corrupt_not_idx(path):
  path.write_bytes(gzip.compress(b'GIF89a' + bytes(100)))


@pytest.mark.parametrize('corrupt,stem,message', [
    (corrupt_gzip_garbage, 'train-images-idx3-ubyte', 'cannot read it.*BadGzipFile'),
    (corrupt_gzip_truncated, 't10k-images-idx3-ubyte', 'cannot read it.*EOFError.*truncated'),
    (corrupt_wrong_magic, 'train-labels-idx1-ubyte', 'magic 0x00000802, expected 0x00000801'),
    (corrupt_idx_body_short, 'train-images-idx3-ubyte',
     r'shape \(20, 28, 28\) \(15680 bytes of data\) but the file holds 15652'),
    (corrupt_not_idx, 't10k-labels-idx1-ubyte', 'not an IDX file'),
])
def test_corrupt_idx_file_raises_naming_it(tmp_path, corrupt, stem, message):
  write_idx_folder(tmp_path, fake_raw(6))
  corrupt(tmp_path / f'{stem}.gz')
  with pytest.raises(data.DataError, match=message) as err:
    data.load('mnist', source='files', data_dir=tmp_path, put=None)
  assert str(tmp_path / f'{stem}.gz') in str(err.value)


def test_idx_labels_must_match_images_in_number(tmp_path):
  raw = fake_raw(7)
  write_idx_folder(tmp_path, raw)
  write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', raw.train_labels[:-1])
  with pytest.raises(data.DataError, match='19 labels for 20 images') as err:
    data.read_idx_folder(tmp_path)
  assert 'train-labels-idx1-ubyte.gz' in str(err.value)


def test_idx_labels_must_be_digits(tmp_path):
  raw = fake_raw(8)
  write_idx_folder(tmp_path, raw)
  write_idx(tmp_path / 't10k-labels-idx1-ubyte', np.full(7, 10))
  (tmp_path / 't10k-labels-idx1-ubyte.gz').unlink()
  with pytest.raises(data.DataError, match=r't10k-labels-idx1-ubyte .*labels must be in \[0, 10\)'):
    data.read_idx_folder(tmp_path)


def test_incomplete_idx_folder_names_missing_files(tmp_path):
  write_idx_folder(tmp_path, fake_raw(9))
  (tmp_path / 't10k-images-idx3-ubyte.gz').unlink()
  with pytest.raises(data.DataError, match=r'incomplete.*missing t10k-images-idx3-ubyte\[\.gz\]'):
    data.load('mnist', source='files', data_dir=tmp_path, put=None)


def test_images_of_another_shape_are_refused(tmp_path):
  write_idx_folder(tmp_path, fake_raw(10, image_shape=(32, 32, 1)))
  with pytest.raises(data.DataError, match=r'shape \[32, 32, 1\], expected \[28, 28, 1\]'):
    data.load('mnist', source='files', data_dir=tmp_path, put=None)


def test_corrupt_keras_npz(tmp_path):
  path = write_keras_npz(tmp_path / 'mnist.npz', fake_raw(11))
  path.write_bytes(path.read_bytes()[:-200])
  with pytest.raises(data.DataError, match='mnist.npz: not a readable Keras mnist.npz'):
    data.read_keras_npz(path)
  np.savez(path, x_train=np.zeros((2, 28, 28), np.uint8))
  with pytest.raises(data.DataError, match='KeyError'):
    data.read_keras_npz(path)


class Evil:
  def __reduce__(self):
    return (os.system, ('touch pwned',))


@pytest.mark.parametrize('content,message', [
    (lambda batch: batch[:len(batch) // 2], 'not a readable CIFAR-10 batch pickle'),
    (lambda batch: b'\x00garbage', 'not a readable CIFAR-10 batch pickle'),
    (lambda batch: pickle.dumps({b'data': Evil()}), 'refusing to load .*system'),
    (lambda batch: pickle.dumps([1, 2]), 'expected a dict'),
    (lambda batch: pickle.dumps({b'data': np.zeros((3, 3000), np.uint8), b'labels': [0] * 3}),
     r"'data' must be uint8 \[n, 3072\].*\[3, 3000\]"),
    (lambda batch: pickle.dumps({b'data': np.zeros((3, 3072), np.uint8), b'labels': [0] * 2}),
     '2 labels for 3 images'),
    (lambda batch: pickle.dumps({b'data': np.zeros((3, 3072), np.uint8), b'labels': [0, 1, 12]}),
     r'labels must be in \[0, 10\)'),
])
def test_corrupt_cifar_batch_raises_naming_it(tmp_path, monkeypatch, content, message):
  monkeypatch.chdir(tmp_path)
  folder = write_cifar_folder(tmp_path / formats.CIFAR_FOLDER, fake_cifar())
  batch = folder / 'data_batch_3'
  batch.write_bytes(content(batch.read_bytes()))
  with pytest.raises(data.DataError, match=message) as err:
    data.load('cifar10', source='files', data_dir=tmp_path, put=None)
  assert str(batch) in str(err.value)
  assert not (tmp_path / 'pwned').exists()


def test_cifar_missing_batch(tmp_path):
  folder = write_cifar_folder(tmp_path / formats.CIFAR_FOLDER, fake_cifar())
  (folder / 'data_batch_5').unlink()
  with pytest.raises(data.DataError, match='incomplete CIFAR-10 folder, missing data_batch_5'):
    data.load('cifar10', source='files', data_dir=tmp_path, put=None)


@pytest.mark.parametrize('keep', [0.5, 0.999])
def test_cifar_truncated_archive(tmp_path, keep):
  tar = write_cifar_tar(tmp_path / formats.CIFAR_ARCHIVE,
                        write_cifar_folder(tmp_path / 'src', fake_cifar()))
  content = tar.read_bytes()
  tar.write_bytes(content[:int(len(content) * keep)])
  with pytest.raises(data.DataError, match=str(tar)):
    data.read_cifar(tar)


def test_cifar_archive_lacking_a_batch(tmp_path):
  folder = write_cifar_folder(tmp_path / 'src', fake_cifar())
  (folder / 'test_batch').unlink()
  tar = write_cifar_tar(tmp_path / formats.CIFAR_ARCHIVE, folder)
  with pytest.raises(data.DataError, match='the archive lacks test_batch'):
    data.read_cifar(tar)


def test_missing_files_say_what_where_and_how(tmp_path):
  with pytest.raises(data.DataNotFoundError) as err:
    data.load('mnist', source='files', data_dir=tmp_path / 'nowhere', put=None)
  message = str(err.value)
  for expected in ('train-images-idx3-ubyte[.gz]', 'mnist.npz', str(tmp_path / 'nowhere'),
                   str(tmp_path / 'nowhere' / 'mnist'), '--data_dir', data.ENV_DATA_DIR,
                   "tfds.data_source('mnist'"):
    assert expected in message


def test_auto_without_files_or_tfds_says_both(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds

  def no_network(*args, **kwargs):
    raise ConnectionError('no route to host')

  monkeypatch.setattr(tfds, 'data_source', no_network)
  with pytest.raises(data.DataNotFoundError) as err:
    data.load('cifar10', data_dir=tmp_path, put=None)
  message = str(err.value)
  assert 'ConnectionError: no route to host' in message
  assert formats.CIFAR_ARCHIVE in message and str(tmp_path / 'cifar10') in message


def test_bad_arguments(tmp_path):
  write_idx_folder(tmp_path, fake_raw(12))
  load = lambda **kw: data.load('mnist', data_dir=tmp_path, put=None, **kw)
  with pytest.raises(ValueError, match="Unknown scaling 'zscore'"):
    load(scaling='zscore')
  with pytest.raises(ValueError, match=r'fraction 1.5 must be in \(0, 1\)'):
    load(validation=1.5)
  with pytest.raises(ValueError, match="validation='train'"):
    load(validation='train')
  with pytest.raises(ValueError, match="Unknown source 'web'"):
    load(source='web')


# --------------------------------------------------------------------------------------------------
# TFDS, TF-free, under tfds.testing.mock_data.


@pytest.mark.parametrize('name', ['mnist', 'cifar10'])
def test_tfds_source_under_mock_data(tmp_path, name):
  import tensorflow_datasets as tfds

  spec = data.spec(name)
  with tfds.testing.mock_data(num_examples=12):
    raw = data.read(name, source='tfds', data_dir=tmp_path)
    unit = data.load(name, source='tfds', data_dir=tmp_path, put=None)
    standard = data.load(name, data_dir=tmp_path, scaling='standardize', validation=0.25)
  assert raw.source.startswith(f'tfds:{spec.tfds_name}@')
  assert standard.source == raw.source  # "auto" found no files and fell back to TFDS
  assert raw.train_images.shape == (12, *spec.image_shape) and raw.train_images.dtype == np.uint8
  assert raw.train_labels.dtype == np.int32 and raw.train_labels.min() >= 0
  assert raw.train_labels.max() < 10
  assert unit.train_images.dtype == np.float32
  np.testing.assert_array_equal(unit.train_images, raw.train_images / np.float32(255))
  np.testing.assert_array_equal(unit.test_labels, raw.test_labels)
  assert standard.train_images.shape == (9, *spec.image_shape)
  assert standard.val_images.shape == (3, *spec.image_shape)
  assert isinstance(standard.train_images, jax.Array)
  np.testing.assert_allclose(jnp.mean(standard.train_images, axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(jnp.std(standard.train_images, axis=(0, 1, 2)), 1, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Preparation, against references.


def test_split_indices_match_scikit_learn():
  # sklearn 1.9.1: train_test_split(np.arange(17), test_size=0.3, random_state=777)
  train, val = data.split_indices(17, 0.3, 777)
  assert train.tolist() == [13, 14, 10, 4, 12, 1, 16, 6, 11, 15, 7]
  assert val.tolist() == [9, 8, 5, 3, 0, 2]
  train, val = data.split_indices(50_000, 0.3, 777)
  assert (len(train), len(val)) == (35_000, 15_000)
  assert sorted(np.concatenate([train, val]).tolist()) == list(range(50_000))


def test_channel_stats_match_numpy():
  images = fake_cifar(13).train_images
  mean, std = data.channel_stats(images)
  np.testing.assert_allclose(mean, (images / 255).mean(axis=(0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(std, (images / 255).std(axis=(0, 1, 2)), rtol=1e-12)


def test_scale_images_is_totensor_then_normalize():
  images = fake_cifar(14).train_images
  mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
  want = ((images.astype(np.float32) / np.float32(255)) - mean.astype(np.float32)) / std.astype(
      np.float32)
  got = data.scale_images(images, mean, std)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)


def test_validation_fraction_holds_out_and_standardizes_on_train_part_only():
  raw = fake_cifar(15)
  ds = data.prepare(raw, data.spec('cifar10'), scaling='standardize', validation=0.3,
                    validation_seed=777)
  train_idx, val_idx = data.split_indices(15, 0.3, 777)
  mean, std = data.channel_stats(raw.train_images[train_idx])
  assert ds.preprocessing.mean == tuple(mean) and ds.preprocessing.std == tuple(std)
  assert not np.allclose(mean, data.channel_stats(raw.train_images)[0])
  np.testing.assert_array_equal(ds.val_images,
                                data.scale_images(raw.train_images[val_idx], mean, std))
  np.testing.assert_array_equal(ds.val_labels, raw.train_labels[val_idx])
  np.testing.assert_array_equal(ds.train_labels, raw.train_labels[train_idx])
  np.testing.assert_array_equal(ds.test_images, data.scale_images(raw.test_images, mean, std))
  assert ds.preprocessing.validation == 0.3 and ds.preprocessing.validation_seed == 777


def test_test_as_validation_is_shared_on_device(tmp_path):
  raw = fake_raw(16)
  write_idx_folder(tmp_path, raw)
  ds = data.load('mnist', data_dir=tmp_path)
  assert ds.val_images is ds.test_images and ds.val_labels is ds.test_labels
  assert isinstance(ds.train_images, jax.Array) and ds.train_images.dtype == jnp.float32
  np.testing.assert_array_equal(ds.train_images, raw.train_images / np.float32(255))
  assert ds.preprocessing == data.Preprocessing('unit', (0.0,), (1.0,), 'test', None)
  assert ds.source == f'idx:{tmp_path}'
  total = jax.jit(lambda d: d.train_images.sum() + d.num_classes)(ds)  # a Dataset is a pytree
  np.testing.assert_allclose(total, raw.train_images.sum() / 255 + 10, rtol=1e-5)


def test_zero_pixel_is_black_after_scaling():
  prep = data.Preprocessing('standardize', (0.5, 0.25), (0.5, 0.25), 'test', None)
  assert prep.zero_pixel == (-1.0, -1.0)
  assert data.Preprocessing('none', None, None, 'test', None).zero_pixel == 0.0


# --------------------------------------------------------------------------------------------------
# On-device augmentation.


def crops_and_flips(image, padding, fill):
  """Every output augment_cifar may give for `image` [H, W, C] (numpy reference)."""
  h, w, _ = image.shape
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  padded[:padding], padded[-padding:] = fill, fill
  padded[:, :padding], padded[:, -padding:] = fill, fill
  for dy in range(2 * padding + 1):
    for dx in range(2 * padding + 1):
      crop = padded[dy:dy + h, dx:dx + w]
      yield (dy, dx, False), crop
      yield (dy, dx, True), crop[:, ::-1]


def test_augment_cifar_is_an_exact_crop_and_flip():
  images = np.random.default_rng(17).normal(size=(64, 32, 32, 3)).astype(np.float32)
  fill = np.array([-1.0, -2.0, -3.0], np.float32)
  out = np.asarray(data.augment_cifar(jax.random.key(0), images, fill=fill))
  assert out.shape == images.shape and out.dtype == np.float32
  seen = set()
  for image, augmented in zip(images, out):
    matches = [p for p, want in crops_and_flips(image, 4, fill) if np.array_equal(augmented, want)]
    assert len(matches) == 1
    seen.add(matches[0])
  assert {flip for _, _, flip in seen} == {False, True}
  assert len({(dy, dx) for dy, dx, _ in seen}) > 20  # offsets spread over the 81 possible


def test_augment_cifar_is_deterministic_and_jittable_in_scan_and_vmap():
  images = jnp.asarray(fake_cifar(18).train_images[:8])
  key = jax.random.key(1)
  eager = data.augment_cifar(key, images)
  assert eager.dtype == jnp.uint8
  np.testing.assert_array_equal(jax.jit(data.augment_cifar)(key, images), eager)
  assert not np.array_equal(data.augment_cifar(jax.random.key(2), images), eager)

  def step(carry, key):
    return carry, data.augment_cifar(key, images)

  keys = jax.random.split(key, 3)
  _, scanned = jax.lax.scan(step, 0, keys)
  vmapped = jax.vmap(data.augment_cifar)(keys, jnp.stack([images] * 3))
  for i in range(3):
    np.testing.assert_array_equal(scanned[i], data.augment_cifar(keys[i], images))
    np.testing.assert_array_equal(vmapped[i], scanned[i])


# --------------------------------------------------------------------------------------------------
# The real data sets.


def timed_load(name, **kwargs):
  start = time.perf_counter()
  ds = jax.block_until_ready(data.load(name, **kwargs))
  print(f'load({name!r}, {kwargs}) took {time.perf_counter() - start:.2f} s')
  return ds


@pytest.mark.integration
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f'the real data sets are not at {SHARED_DATA}')
class TestSharedData:

  def test_mnist(self):
    raw = data.read('mnist', source='files', data_dir=SHARED_DATA)
    assert (len(raw.train_labels), len(raw.test_labels)) == (60_000, 10_000)
    assert raw.train_images.mean(dtype=np.float64) == pytest.approx(33.318, abs=5e-4)
    assert np.bincount(raw.train_labels).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    ds = timed_load('mnist', source='files', data_dir=SHARED_DATA)
    assert ds.source == f"idx:{SHARED_DATA / 'mnist'}"
    assert ds.train_images.shape == (60_000, 28, 28, 1)
    assert ds.val_images.shape == (10_000, 28, 28, 1)
    assert np.asarray(ds.train_images).mean(dtype=np.float64) == pytest.approx(0.13066, abs=5e-6)

  def test_cifar10(self):
    ds = timed_load('cifar10', source='files', data_dir=SHARED_DATA, scaling='unit')
    assert ds.train_images.shape == (50_000, 32, 32, 3) and ds.test_images.shape[0] == 10_000
    np.testing.assert_allclose(jnp.mean(ds.train_images, axis=(0, 1, 2)),
                               (0.4914, 0.4822, 0.4465), atol=5e-5)
    np.testing.assert_allclose(jnp.std(ds.train_images, axis=(0, 1, 2)),
                               (0.2470, 0.2435, 0.2616), atol=5e-5)
    np.testing.assert_array_equal(np.bincount(np.asarray(ds.train_labels[:10_000])),
                                  [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981])

  def test_cifar10_study_split(self):
    ds = timed_load('cifar10', data_dir=SHARED_DATA, scaling='standardize', validation=0.3)
    assert (ds.train_images.shape[0], ds.val_images.shape[0], ds.test_images.shape[0]) == (
        35_000, 15_000, 10_000)
    np.testing.assert_allclose(ds.preprocessing.mean, (0.4914, 0.4822, 0.4465), atol=2e-3)
    np.testing.assert_allclose(jnp.mean(ds.train_images, axis=(0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(jnp.std(ds.train_images, axis=(0, 1, 2)), 1, atol=1e-4)


@pytest.mark.integration
@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                    reason=f'{DEBIAN_FASHION_MNIST} is absent: apt-get install '
                    'dataset-fashion-mnist')
def test_fashion_mnist_from_debian_package():
  ds = timed_load('fashion_mnist', source='files', put=None)
  assert ds.source == f'idx:{DEBIAN_FASHION_MNIST}'
  assert (len(ds.train_labels), len(ds.test_labels)) == (60_000, 10_000)
  assert np.bincount(ds.train_labels).tolist() == [6000] * 10
  assert ds.train_images.mean(dtype=np.float64) == pytest.approx(0.2860, abs=5e-5)  # 72.94 / 255
