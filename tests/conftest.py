"""Shared test set-up: paths, and the generated data sets every training test uses (fixtures.py writes them)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Keras 3 is a numerical oracle (batch renorm, parameter counts); it must run on JAX, whichever test
# module imports it first.
os.environ.setdefault('KERAS_BACKEND', 'jax')

# One persistent XLA compilation cache for the whole session, shared by the xdist workers and the CLI
# subprocesses (they inherit the environment): many tests compile the same programs. It starts empty,
# so every run of the suite (and CI) compiles everything at least once.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit
  import shutil
  import tempfile

  _cache = tempfile.mkdtemp(prefix='bnjax-test-xla-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)  # the process that made it (the xdist controller)

# The suite compiles hundreds of small programs and runs each for a few steps: LLVM's optimizations cost
# more than they save here (measured: 0.73x the time of the study tests). Results can differ in the last
# bits from the default level (e.g. where it contracts a multiply and an add), so no test compares with a
# number recorded at another level. CLI subprocesses inherit it (the multi-device tests add their flags).
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A folder with `learnable_digits` written as MNIST's IDX files (`data_dir/mnist`)."""
  from fixtures import write_learnable_mnist

  folder = tmp_path_factory.mktemp('data')
  write_learnable_mnist(folder)
  return folder


@pytest.fixture(scope='session')
def study_data_dir(tmp_path_factory):
  """MNIST look-alike (5000 train) and a small CIFAR-10 look-alike: every study runs on them at a tiny budget."""
  import numpy as np

  from fixtures import learnable_digits, write_cifar_folder, write_learnable_mnist

  folder = tmp_path_factory.mktemp('study_data')
  write_learnable_mnist(folder, num_train=5000, num_test=400)
  cifar = learnable_digits(seed=1, num_train=140, num_test=40)
  # 32x32x3 images from the 28x28 digits (padded, channels repeated), so the CNN has something to learn.
  pad = lambda images: np.repeat(np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))), 3, axis=-1)
  write_cifar_folder(folder / 'cifar10' / 'cifar-10-batches-py',
                     cifar._replace(train_images=pad(cifar.train_images), test_images=pad(cifar.test_images)))
  return str(folder)


def run_script(script, *flags, timeout=600, env=None):
  """Runs a CLI of experiments/ as a user does (a subprocess on CPU); returns the CompletedProcess."""
  environment = dict(os.environ, JAX_PLATFORMS='cpu', **(env or {}))
  return subprocess.run([sys.executable, str(REPO / 'experiments' / script), *map(str, flags)], capture_output=True,
                        text=True, timeout=timeout, cwd=REPO, env=environment)


def mounted_tmpfs(folder, size):
  """Mounts a tmpfs of `size` (e.g. '1m') on the new folder `folder`, yields it, unmounts it; skips the test where
  mounting is not allowed (not root)."""
  folder.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(folder)], capture_output=True).returncode:
    pytest.skip('cannot mount a tmpfs here (not root)')
  try:
    yield folder
  finally:
    subprocess.run(['umount', str(folder)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
  """A 64 MiB tmpfs (see `mounted_tmpfs`), and a function filling it up to `left` free bytes."""
  import shutil

  def fill(left=64 << 10):
    with open(mount / 'filler', 'wb') as f:
      f.write(b'\0' * max(0, shutil.disk_usage(mount).free - left))

  for mount in mounted_tmpfs(tmp_path / 'disk', '64m'):
    yield mount, fill
