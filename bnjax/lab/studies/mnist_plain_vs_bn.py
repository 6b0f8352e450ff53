"""The source's MNIST study: the MLP plain vs with BN (Adam, 20 epochs, batch 500), two single runs."""

from bnjax.lab.study import single_runs_study
from bnjax.lab.study_common import MNIST

STUDY = single_runs_study(
    'mnist_plain_vs_bn', 'The source: MNIST MLP, plain vs BN: Adam, 20 epochs, batch 500, test set as validation.',
    dict(MNIST, scaling='unit', epochs=20, batch_size=500), runs={'plain': dict(norm='none'), 'bn': dict(norm='bn')})
