"""The rule of thumb (small batch: high BN momentum; large batch: low, or inverse decay), a grid over momentum x
batch size on the MNIST MLP."""

from bnjax.lab.study import grid_study
from bnjax.lab.study_common import MNIST, MOMENTA

STUDY = grid_study(
    'momentum_batch_size', 'The rule of thumb: small batch -> high momentum, large batch -> low momentum (or inverse '
    'decay). Momentum 0.6..0.99 + inverse decay x batch 32..5000, MNIST MLP, 1 epoch, 2 seeds.',
    cpu=dict(MNIST, norm='bn', epochs=1, momentum=MOMENTA, momentum_schedule=['constant', 'inverse_decay'],
             batch_size=[32, 128, 500, 5000], seed=[0, 1]),
    full=dict(MNIST, norm='bn', epochs=20, momentum=MOMENTA, momentum_schedule=['constant', 'inverse_decay'],
              batch_size=[32, 128, 500, 5000], seed=[0, 1, 2]))
