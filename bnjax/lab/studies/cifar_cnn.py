"""The source's CIFAR-10 study: the CNN with BN (Adam 1e-4, batch 32, 30 epochs, 30% held out), one run."""

from bnjax.lab.study import single_runs_study
from bnjax.lab.study_common import CIFAR

STUDY = single_runs_study(
    'cifar_cnn', 'The source: CIFAR-10 CNN with BN: Adam 1e-4, batch 32, 30 epochs, 30% of train held out (seed 777).',
    dict(CIFAR), runs={'run': {}})
