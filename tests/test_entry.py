"""bnjax.lab.entry: what the scripts run (the scripts themselves: test_train_cli.py, test_sweep.py,
test_study_cli.py); here what needs no training."""

import re

import pytest

from bnjax.lab import entry, studies


def test_default_workdir_names_the_model_and_norm():
  assert re.fullmatch(r'runs/resnet20-group-\d{8}-\d{6}', entry.default_workdir({'model': 'resnet20', 'norm': 'group'}))
  assert entry.default_workdir({'model': 'my_package.nets:build'}).startswith('runs/my_package.nets.build-bn-')


def test_describe_studies_lists_the_registry_and_repro_all():
  text = entry.describe_studies()
  names = [line.split(':')[0] for line in text.splitlines() if not line.startswith(' ')]
  assert names == list(studies.STUDIES) + [studies.ALL_REPRODUCTIONS]
  assert 'settings: every training option' in text and 'settings: epochs, seeds, momenta' in text


def test_a_resume_needs_its_workdir_and_bad_settings_fail_before_any_work(tmp_path):
  with pytest.raises(ValueError, match='--resume needs the --workdir'):
    entry.train({'epochs': 1}, resume=True)
  with pytest.raises(ValueError, match='settings apply to one study'):
    entry.run_studies('repro_all', str(tmp_path), overrides={'epochs': '1'})
  with pytest.raises(ValueError, match='no setting --epoch'):
    entry.run_studies('repro_seed000', str(tmp_path), overrides={'epoch': '1'})
  with pytest.raises(ValueError, match='--max_group_size=0'):
    entry.sweep({'seed': [0, 1]}, max_group_size=0)
  with pytest.raises(ValueError, match='--claim_timeout=inf'):
    entry.sweep({'seed': [0, 1]}, claim_timeout=float('inf'))
  assert not any(tmp_path.iterdir())
