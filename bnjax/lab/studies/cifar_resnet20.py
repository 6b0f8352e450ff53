"""He et al. 2016's ResNet-20 on CIFAR-10 with their recipe (the model's own training settings), one run."""

from bnjax.lab.study import single_runs_study

# ResNet-20 with its own training settings (bnjax.lab.registry), the test set as validation.
RESNET20 = dict(model='resnet20', validation='test')

STUDY = single_runs_study(
    'cifar_resnet20', "He et al. 2016's ResNet-20 on CIFAR-10 with their recipe (SGD momentum 0.9, lr 0.1 divided by "
    '10 at 50% and 75%, weight decay 1e-4, batch 128, crop + flip, per-channel standardization); the paper: 8.75% '
    'test error after 64k iterations.',
    dict(RESNET20, steps=10_000), runs={'run': {}}, full=dict(RESNET20, steps=64_000))
