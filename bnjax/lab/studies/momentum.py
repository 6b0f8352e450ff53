"""BN momentum on the MNIST MLP at batch 500: 0.6..0.99 and the inverse-decay schedule, a grid over seeds."""

from bnjax.lab.study import grid_study
from bnjax.lab.study_common import MNIST, MOMENTA

STUDY = grid_study(
    'momentum', 'BN momentum on the MNIST MLP at batch 500: 0.6..0.99 and the inverse-decay schedule; 2 epochs, 3 '
    'seeds (one program of 15 lanes + one of 3).',
    cpu=dict(MNIST, norm='bn', batch_size=500, epochs=2, momentum=MOMENTA,
             momentum_schedule=['constant', 'inverse_decay'], seed=[0, 1, 2]),
    full=dict(MNIST, norm='bn', batch_size=500, epochs=20, momentum=MOMENTA,
              momentum_schedule=['constant', 'inverse_decay'], seed=[0, 1, 2]))
