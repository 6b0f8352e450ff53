"""Dropout placement (the variance shift of dropout before BN) x rate x norm on the MNIST MLP, a grid."""

from bnjax.lab.study import grid_study
from bnjax.lab.study_common import MNIST

PLACEMENTS = ['none', 'before_norm', 'after_norm', 'end']

STUDY = grid_study(
    'dropout', 'Dropout placement (none, before_norm: the variance shift, after_norm, end) x rate 0.2/0.5 x norm '
    'none/bn, MNIST MLP, batch 500, 2 epochs, 2 seeds.',
    cpu=dict(MNIST, batch_size=500, epochs=2, dropout_placement=PLACEMENTS, dropout_rate=[0.2, 0.5],
             norm=['none', 'bn'], seed=[0, 1]),
    full=dict(MNIST, batch_size=500, epochs=20, dropout_placement=PLACEMENTS, dropout_rate=[0.2, 0.5],
              norm=['none', 'bn'], seed=[0, 1, 2]))
