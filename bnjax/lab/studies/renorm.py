"""Batch renorm vs BN vs no norm at small batches (2..32) on the MNIST MLP, a grid; renorm's clipping warm-up
scaled to each run's length."""

from bnjax.lab.study import grid_study
from bnjax.lab.study_common import MNIST, renorm_warmup_scaled

STUDY = grid_study(
    'renorm', 'Batch renorm vs BN vs none at small batches (2, 4, 8, 32), MNIST MLP, 600 steps each (renorm with the '
    "paper's clipping warm-up scaled to the run), 2 seeds.",
    cpu=dict(MNIST, steps=600, batch_size=[2, 4, 8, 32], norm=['bn', 'renorm', 'none'], seed=[0, 1]),
    full=dict(MNIST, steps=20000, batch_size=[2, 4, 8, 32], norm=['bn', 'renorm', 'none'], seed=[0, 1, 2]),
    finalize=renorm_warmup_scaled)
