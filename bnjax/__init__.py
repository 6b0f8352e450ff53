"""bnjax: batch normalization as pure JAX functions, and experiments that study it.

The functional core needs only JAX:

    import bnjax
    params, state = bnjax.batch_norm_init(64)
    y, state = bnjax.batch_norm(x, params, state, training=True)

Precise BN (population statistics under fixed weights, Wu & Johnson 2021)
is `bnjax.precise`: `precise_statistics`, `with_population_statistics`, and
the accumulator `bnjax.precise.init/update/finalize`.

Four modules pull in more and load on first access: `bnjax.linen` and
`bnjax.nnx`, the Flax modules (linen and NNX) around the core,
`bnjax.adapt`, test-time adaptation of the norm layers (prediction-time
BN, the Schneider prior, AdaBN, TENT; Flax and optax), and `bnjax.lab`,
the experiment machinery (models, data, training loop, sweeps, studies). The core never imports them.
"""

import importlib

from bnjax import layers  # what the Flax layers share (flax-free)
from bnjax import torch_interop  # PyTorch's BN state dicts (no torch import)
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
from bnjax.precise import PreciseState, precise_statistics, with_population_statistics
from bnjax.schedules import (
    as_schedule,
    inverse_decay_momentum,
    momentum_from_pytorch,
    renorm_clipping_warmup,
)

__version__ = '0.1.0'

_LAZY_SUBMODULES = ('linen', 'nnx', 'lab', 'adapt')


def __getattr__(name):
  if name in _LAZY_SUBMODULES:
    return importlib.import_module(f'bnjax.{name}')
  raise AttributeError(f"module 'bnjax' has no attribute {name!r} (its submodules loaded on first access: "
                       f"{', '.join(_LAZY_SUBMODULES)}; the lab's modules are bnjax.lab.<name>)")
