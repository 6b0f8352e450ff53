"""bnjax: batch normalization as pure JAX functions, and experiments that study it.

The functional core needs only JAX:

    import bnjax
    params, state = bnjax.batch_norm_init(64)
    y, state = bnjax.batch_norm(x, params, state, training=True)

Submodules that pull in more (Flax modules, models, data, training) load on
first access: `bnjax.flax`, `bnjax.models`, `bnjax.data`, ...
"""

import importlib

from bnjax.moments import Moments, batch_moments, pooled_moments
from bnjax.norm import (
    BatchNormState,
    BatchRenormState,
    batch_norm,
    batch_norm_init,
    batch_renorm,
    batch_renorm_init,
    moving_statistics,
)
from bnjax.schedules import (
    as_schedule,
    inverse_decay_momentum,
    momentum_from_pytorch,
    renorm_clipping_warmup,
)

__version__ = '0.1.0'

_LAZY_SUBMODULES = (
    'flax', 'models', 'data', 'config', 'build', 'engine', 'experiment', 'plots', 'parallel', 'sweep', 'report',
    'diagnostics', 'repro',
)


def __getattr__(name):
  if name in _LAZY_SUBMODULES:
    return importlib.import_module(f'bnjax.{name}')
  raise AttributeError(f"module 'bnjax' has no attribute {name!r}")
