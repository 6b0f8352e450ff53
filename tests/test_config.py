"""bnjax.lab.config: every invalid value or combination is rejected naming its flag."""

import pytest

from bnjax.lab import config as C

INVALID = [
    (dict(batch_size=0), '--batch_size=0'),
    (dict(batch_size=-5), '--batch_size=-5'),
    (dict(epochs=0), '--epochs=0'),
    (dict(steps=0), '--steps=0'),
    (dict(momentum=1.5), '--momentum=1.5'),
    (dict(momentum=-0.1), '--momentum=-0.1'),
    (dict(epsilon=0.0), '--epsilon=0.0'),
    (dict(dropout_rate=1.0, dropout_placement='end'), '--dropout_rate=1.0'),
    (dict(dropout_rate=-0.1, dropout_placement='end'), '--dropout_rate=-0.1'),
    (dict(dropout_rate=0.3), '--dropout_rate=0.3'),  # no placement
    (dict(dropout_placement='end'), '--dropout_rate=0.0'),  # placement without a rate
    (dict(norm='bn', rmax=2.0), '--rmax=2.0'),  # renorm option with norm=bn
    (dict(norm='bn', renorm_momentum=0.9), '--renorm_momentum=0.9'),
    (dict(norm='renorm', rmax=0.5), '--rmax=0.5'),
    (dict(norm='renorm', dmax=-1.0), '--dmax=-1.0'),
    (dict(norm='ghost'), '--virtual_batch_size=None'),
    (dict(norm='ghost', virtual_batch_size=7), '--virtual_batch_size=7'),
    (dict(norm='bn', virtual_batch_size=50), '--virtual_batch_size=50'),
    (dict(norm='none', update_stats=False), '--update_stats=False'),
    (dict(norm='bogus'), '--norm=.bogus.'),
    (dict(model='resnet'), '--model=.resnet.'),
    (dict(dataset='imagenet'), '--dataset=.imagenet.'),
    (dict(optimizer='lamb'), '--optimizer=.lamb.'),
    (dict(validation='half'), '--validation=.half.'),
    (dict(validation='1.5'), '--validation=.1.5.'),
    (dict(learning_rate=0.0), '--learning_rate=0.0'),
    (dict(model='cifar_cnn', dataset='mnist'), '--model=.cifar_cnn.'),
    (dict(augment=True), '--augment=True'),
    (dict(momentum_decay_rate=1.0), '--momentum_decay_rate=1.0'),
    (dict(norm='bn', batch_size=1), '--batch_size=1 is invalid: expected at least 2 with --norm=bn'),
    (dict(norm='renorm', batch_size=1), '--batch_size=1'),
    (dict(norm='ghost', virtual_batch_size=1), '--virtual_batch_size=1'),
    (dict(norm='bn', eval_stats='batch', eval_batch_size=1), '--eval_batch_size=1'),
    (dict(seed=2**32), '--seed=4294967296'),
    (dict(seed=-1), '--seed=-1'),
]


def test_a_batch_of_one_trains_without_batch_statistics():
  C.validate(C.TrainConfig(norm='group', num_groups=1, batch_size=1))
  C.validate(C.TrainConfig(norm='none', batch_size=1))


def test_spellings_of_one_value_are_one_run():
  values = C.parse_values('validation', '0.3,.30,0.30')
  assert values == ['0.3'] * 3
  assert C.run_id(C.TrainConfig(validation='.30')) == C.run_id(C.TrainConfig(validation='0.3'))
  assert C.parse_value('validation', 'test') == 'test'
  with pytest.raises(ValueError, match='--validation=.half.'):
    C.validate(C.TrainConfig(validation=C.parse_value('validation', 'half')))


@pytest.mark.parametrize('settings, message', INVALID, ids=[m for _, m in INVALID])
def test_invalid_values_are_rejected_naming_the_flag(settings, message):
  with pytest.raises(ValueError, match=message):
    C.validate(C.TrainConfig(**settings))


def test_defaults_and_valid_combinations_pass():
  C.validate(C.TrainConfig())
  C.validate(C.TrainConfig(norm='ghost', virtual_batch_size=50))
  C.validate(C.TrainConfig(norm='renorm', rmax=2.0, dmax=1.0, renorm_clipping='warmup', virtual_batch_size=100))
  C.validate(C.TrainConfig(dataset='cifar10', model='cifar_cnn', augment=True, validation='0.3'))


def test_unknown_setting():
  with pytest.raises(ValueError, match='unknown settings'):
    C.make({'momentum_typo': 0.9})
