"""bnjax.lab.studies and bnjax.lab.study: the registry is the folder's files; a study's settings per budget,
checked in one line; a study's folder reused, resumed or replaced; the single-run studies' configs."""

import pkgutil
from pathlib import Path

import pytest

from bnjax.lab import studies
from bnjax.lab.study import BUDGETS, Study, single_run_configs

QUIET = lambda message: None


def test_the_registry_is_exactly_the_files_of_the_package():
  files = sorted(path.stem for path in Path(studies.__file__).parent.glob('*.py') if path.stem != '__init__')
  assert list(studies.STUDIES) == files
  assert [info.name for info in pkgutil.iter_modules(studies.__path__)] == files
  for name, study in studies.STUDIES.items():
    assert isinstance(study, Study) and study.name == name
  assert studies.REPRODUCTIONS == tuple(name for name in files if name.startswith('repro_'))


def test_every_study_has_both_budgets_with_the_same_settings():
  for study in studies.STUDIES.values():
    assert set(study.budgets) == set(BUDGETS)
    assert set(study.budgets['cpu']) == set(study.budgets['full'])


def test_old_names_are_refused_in_one_line():
  for old in ('seed000', 'seed003', 'fig1', 'renorm_repro', 'nope'):
    with pytest.raises(ValueError, match=f"^--study='{old}' is invalid: expected one of batch_size, ") as error:
      studies.get(old)
    assert '\n' not in str(error.value) and 'old name' not in str(error.value)


def test_the_source_studies():
  plain_vs_bn = studies.get('mnist_plain_vs_bn')
  assert plain_vs_bn.runs == {'plain': dict(norm='none'), 'bn': dict(norm='bn')}
  settings = studies.settings_for('mnist_plain_vs_bn', 'cpu')
  assert (settings['dataset'], settings['model'], settings['optimizer'], settings['epochs'], settings['batch_size'],
          settings['validation']) == ('mnist', 'mnist_mlp', 'adam', 20, 500, 'test')
  cifar = studies.settings_for('cifar_cnn', 'full')
  assert (cifar['model'], cifar['learning_rate'], cifar['batch_size'], cifar['epochs']) == ('cifar_cnn', 1e-4, 32, 30)
  assert (cifar['validation'], cifar['validation_seed'], cifar['scaling']) == ('0.3', 777, 'standardize')
  assert studies.settings_for('mnist_plain_vs_bn', 'cpu', {'epochs': '1', 'batch_size': '100'})['epochs'] == 1


def test_settings_reject_unknown_names_and_budgets():
  assert studies.settings_for('repro_seed003', 'full')['epochs'] == 30
  assert studies.settings_for('repro_seed000', 'cpu', {'epochs': 3})['epochs'] == 3
  with pytest.raises(ValueError, match='no setting --epoch'):
    studies.settings_for('repro_seed000', 'cpu', {'epoch': 3})
  with pytest.raises(ValueError, match='--budget'):
    studies.settings_for('repro_seed000', 'gpu')
  with pytest.raises(ValueError, match='--study'):
    studies.settings_for('repro_fig2', 'cpu')


def test_steps_or_epochs_given_replaces_the_studys_other_length():
  settings = studies.settings_for('cifar_cnn', 'cpu', {'steps': '300'})
  assert settings['steps'] == 300 and 'epochs' not in settings
  settings = studies.settings_for('renorm', 'cpu', {'epochs': '2'})  # a grid study set in steps
  assert settings['epochs'] == 2 and 'steps' not in settings
  assert studies.settings_for('cifar_cnn', 'cpu', {'steps': '300', 'epochs': '2'})['epochs'] == 2  # both given: both


def test_grid_studies_take_a_models_own_settings():
  # The momentum x batch size study on ResNet-20: its recipe, the study's axes and length.
  settings = studies.settings_for('momentum_batch_size', 'cpu', {'model': 'resnet20'})
  assert (settings['dataset'], settings['optimizer'], settings['epochs']) == ('cifar10', 'momentum', 1)
  assert settings['batch_size'] == [32, 128, 500, 5000] and len(settings['momentum']) == 5
  assert studies.get('cifar_resnet20').budgets['full']['steps'] == 64_000


def test_every_single_run_study_builds_valid_runs_with_its_models_recipe(tmp_path):
  single_run_studies = [study for study in studies.STUDIES.values() if study.runs is not None]
  assert {study.name for study in single_run_studies} == {'mnist_plain_vs_bn', 'cifar_cnn', 'cifar_resnet20'}
  for study in single_run_studies:
    for budget in BUDGETS:
      configs = single_run_configs(tmp_path, studies.settings_for(study.name, budget), None, study.runs)
      assert set(configs) == set(study.runs), study.name
  (resnet,) = single_run_configs(tmp_path, studies.settings_for('cifar_resnet20', 'cpu'), None, {'run': {}}).values()
  assert (resnet.dataset, resnet.optimizer, resnet.batch_size, resnet.augment) == ('cifar10', 'momentum', 128, True)
  assert (resnet.steps, resnet.validation, resnet.weight_decay) == (10_000, 'test', 1e-4)


def test_resume_and_overwrite_are_checked_before_any_work(tmp_path):
  with pytest.raises(ValueError, match='--resume: .* holds no run of study repro_seed003'):
    studies.run_study('repro_seed003', tmp_path, log=QUIET, resume=True)
  with pytest.raises(ValueError, match='--resume and --overwrite exclude each other'):
    studies.run_study('repro_seed003', tmp_path, log=QUIET, resume=True, overwrite=True)
  assert not any(tmp_path.iterdir())
