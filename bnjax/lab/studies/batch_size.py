"""Batch size 32..5000 with BN (momentum 0.99) on the MNIST MLP, a grid over seeds."""

from bnjax.lab.study import grid_study
from bnjax.lab.study_common import MNIST

STUDY = grid_study(
    'batch_size', 'Batch size 32..5000 with BN (momentum 0.99), MNIST MLP, 1 epoch, 2 seeds.',
    cpu=dict(MNIST, norm='bn', epochs=1, batch_size=[32, 128, 500, 5000], seed=[0, 1]),
    full=dict(MNIST, norm='bn', epochs=20, batch_size=[32, 128, 500, 5000], seed=[0, 1, 2]))
