"""Shared test set-up: tests import helpers from tests/ (fixtures.py) by name."""

import os
import sys
from pathlib import Path

# Keras 3 is a numerical oracle (batch renorm, parameter counts); it must run on JAX, whichever test
# module imports it first.
os.environ.setdefault('KERAS_BACKEND', 'jax')

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'
