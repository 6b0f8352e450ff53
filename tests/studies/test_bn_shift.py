"""The bn_shift study at a tiny budget: trains, reuses the finished runs, evaluates every method, writes
its tables and plots; and the --adapt option of a single run."""

import json

import pytest

from bnjax.lab import config as config_lib
from bnjax.lab import studies
from bnjax.lab.studies import bn_shift

TINY = dict(datasets='mnist', mnist_models='bn,layer', mnist_epochs='1', severities='1,5',
            mnist_corruptions='brightness,stripe', test_examples='400', test_batch_size='100')


def test_bn_shift_tiny_budget(tmp_path, data_dir):
  logged = []
  results = studies.run_study('bn_shift', tmp_path, overrides=TINY, data_dir=str(data_dir), log=logged.append)
  out = tmp_path / 'bn_shift'
  errors = results['results']['errors']['mnist']
  assert set(errors) == {'bn', 'layer'}
  for model in errors.values():
    assert set(model) == {'brightness', 'stripe'}
    for severity in ('1', '5'):
      assert set(model['brightness'][severity]) == set(bn_shift.METHODS)
      assert all(0 <= e <= 1 for e in model['brightness'][severity].values())
  # Layer norm has no statistics to re-estimate: those methods are its source model.
  layer = errors['layer']['brightness']['5']
  assert layer['prediction_bn'] == layer['adabn'] == layer['prior'] == layer['source']
  for name in ('table.md', 'errors.md', 'results.json', 'mnist_bn_severity.png', 'mnist_layer_bars.png'):
    assert (out / name).is_file(), name
  assert 'mean, severity 5' in (out / 'table.md').read_text()
  # A second run reuses the trained model (resumed from its last checkpoint, no epoch trained again) and
  # gives the same numbers.
  logged.clear()
  again = studies.run_study('bn_shift', tmp_path / 'again',
                            overrides=dict(TINY, mnist_models='bn', severities='5', mnist_corruptions='stripe',
                                           models_dir=str(out / 'models')),
                            data_dir=str(data_dir), log=logged.append)
  assert any('resumed from the checkpoint of epoch 1' in line for line in logged), logged
  assert again['results']['errors']['mnist']['bn']['stripe']['5'] == errors['bn']['stripe']['5']


def test_adapt_options_are_checked_in_one_line():
  for settings, flag in (({'adapt': 'source,magic'}, '--adapt'), ({'tent_lr': 0.1}, '--tent_lr'),
                         ({'adapt': 'tent', 'tent_optimizer': 'rmsprop'}, '--tent_optimizer'),
                         ({'norm': 'ghost', 'virtual_batch_size': 50, 'adapt': 'tent', 'test_batch_size': 120},
                          '--test_batch_size')):
    with pytest.raises(ValueError, match=flag) as error:
      config_lib.make(settings)
    assert '\n' not in str(error.value)
  assert config_lib.make({'adapt': 'source+tent', 'tent_lr': 0.01}).tent_lr == 0.01


def test_resnet20_source_model_is_the_cifar_resnet20_study_run(tmp_path):
  """bn_shift's resnet20 is the cifar_resnet20 study's run (same identity, its folder), so a finished run is
  reused; listing it for MNIST is one line naming the flag."""
  from bnjax.lab import rundir
  from bnjax.lab import study as study_lib
  from bnjax.lab.studies import cifar_resnet20

  for budget in ('cpu', 'full'):
    settings = bn_shift.STUDY.budgets[budget]
    ours = bn_shift.model_config('cifar10', 'resnet20', settings, tmp_path / 'cifar_resnet20' / 'run', None)
    theirs = study_lib.single_run_configs(tmp_path / 'cifar_resnet20', cifar_resnet20.STUDY.budgets[budget], None,
                                          cifar_resnet20.STUDY.runs)['run']
    assert rundir.resume_conflicts(theirs, ours) == [] and ours.steps == theirs.steps
    assert (ours.model, ours.dataset, ours.optimizer, ours.batch_size) == ('resnet20', 'cifar10', 'momentum', 128)
    assert ours.workdir == theirs.workdir
  assert tmp_path / bn_shift.STUDY_RUNS['resnet20'] == tmp_path / 'cifar_resnet20' / 'run'
  with pytest.raises(ValueError, match='--mnist_models') as error:
    bn_shift.model_config('mnist', 'resnet20', bn_shift.STUDY.budgets['cpu'], tmp_path, None)
  assert '\n' not in str(error.value)
