"""Shared test set-up: paths, and the generated data sets every training test uses (fixtures.py writes them)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Keras 3 is a numerical oracle (batch renorm, parameter counts); it must run on JAX, whichever test
# module imports it first.
os.environ.setdefault('KERAS_BACKEND', 'jax')

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A folder with `learnable_digits` written as MNIST's IDX files (`data_dir/mnist`)."""
  from fixtures import write_learnable_mnist

  folder = tmp_path_factory.mktemp('data')
  write_learnable_mnist(folder)
  return folder


def run_script(script, *flags, timeout=600, env=None):
  """Runs a CLI of experiments/ as a user does (a subprocess on CPU); returns the CompletedProcess."""
  environment = dict(os.environ, JAX_PLATFORMS='cpu', **(env or {}))
  return subprocess.run([sys.executable, str(REPO / 'experiments' / script), *map(str, flags)], capture_output=True,
                        text=True, timeout=timeout, cwd=REPO, env=environment)
