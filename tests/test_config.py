"""bnjax.lab.config: every invalid value or combination is rejected naming its flag; presets resolve."""

import dataclasses

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
    (dict(model='cnn_seed', dataset='mnist'), '--model=.cnn_seed.'),
    (dict(augment=True), '--augment=True'),
    (dict(momentum_decay_rate=1.0), '--momentum_decay_rate=1.0'),
]


@pytest.mark.parametrize('settings, message', INVALID, ids=[m for _, m in INVALID])
def test_invalid_values_are_rejected_naming_the_flag(settings, message):
  with pytest.raises(ValueError, match=message):
    C.validate(C.TrainConfig(**settings))


def test_defaults_and_valid_combinations_pass():
  C.validate(C.TrainConfig())
  C.validate(C.TrainConfig(norm='ghost', virtual_batch_size=50))
  C.validate(C.TrainConfig(norm='renorm', rmax=2.0, dmax=1.0, renorm_clipping='warmup', virtual_batch_size=100))
  C.validate(C.TrainConfig(dataset='cifar10', model='cnn_seed', augment=True, validation='0.3'))


def test_preset_seed000_has_a_plain_and_a_bn_variant():
  configs = C.resolve('seed000')
  assert list(configs) == ['plain', 'bn']
  assert configs['plain'].norm == 'none' and configs['bn'].norm == 'bn'
  for config in configs.values():
    assert (config.dataset, config.model, config.optimizer, config.epochs, config.batch_size, config.validation) == (
        'mnist', 'mlp_seed', 'adam', 20, 500, 'test')


def test_preset_seed003_is_the_cifar_study():
  (config,) = C.resolve('seed003').values()
  assert (config.model, config.learning_rate, config.batch_size, config.epochs) == ('cnn_seed', 1e-4, 32, 30)
  assert (config.validation, config.validation_seed, config.scaling) == ('0.3', 777, 'standardize')


def test_flags_override_the_preset():
  configs = C.resolve('seed000', {'epochs': 1, 'batch_size': 100})
  assert all(c.epochs == 1 and c.batch_size == 100 for c in configs.values())
  configs = C.resolve('seed000', {'norm': 'renorm'})
  assert all(c.norm == 'renorm' for c in configs.values())


def test_unknown_preset_and_setting():
  with pytest.raises(ValueError, match='--preset=.nope.'):
    C.resolve('nope')
  with pytest.raises(ValueError, match='unknown settings'):
    C.resolve(None, {'momentum_typo': 0.9})


def test_every_field_is_a_documented_flag():
  from conftest import REPO
  source = (REPO / 'experiments' / 'train.py').read_text()
  for field in dataclasses.fields(C.TrainConfig):
    assert f"'{field.name}':" in source, f'experiments/train.py has no help text for {field.name}'
