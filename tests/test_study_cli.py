"""experiments/study.py (and launch.sh) as a user runs them: the one entry point of the named studies."""

import json
import subprocess

from bnjax.lab import studies
from conftest import REPO, run_script


def _one_line_error(result, *needles):
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in result.stderr, result.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]


def test_list_names_every_study_of_the_registry():
  result = run_script('study.py', '--list', timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  listed = [line.split(':')[0] for line in result.stdout.splitlines() if line and not line.startswith(' ')]
  assert listed == list(studies.STUDIES) + ['repro_all']
  assert 'old name' not in result.stdout


def test_launch_sh_help_points_at_the_list_of_studies():
  result = subprocess.run([str(REPO / 'launch.sh'), 'help'], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and './launch.sh list' in result.stdout
  assert 'seed000' not in result.stdout and 'preset' not in result.stdout


def test_old_names_are_refused_in_one_line(tmp_path):
  _one_line_error(run_script('study.py', '--study=seed000', f'--out={tmp_path}', timeout=120),
                  "--study='seed000' is invalid: expected one of")
  _one_line_error(run_script('study.py', '--study=fig1', f'--out={tmp_path}', timeout=120), "--study='fig1'")
  _one_line_error(run_script('study.py', '--study=repro_fig1', '--set=steps=20', f'--out={tmp_path}', timeout=120),
                  "Unknown command line flag 'set'")
  _one_line_error(run_script('study.py', '--preset=momentum', f'--out={tmp_path}', timeout=120),
                  "Unknown command line flag 'preset'")
  assert not any(tmp_path.iterdir())


def test_bad_settings_are_refused_before_any_work(tmp_path):
  _one_line_error(run_script('study.py', '--study=repro_seed000', '--epoch=3', f'--out={tmp_path}', timeout=120),
                  'epoch')
  _one_line_error(run_script('study.py', '--study=repro_all', '--epochs=3', f'--out={tmp_path}', timeout=120),
                  'settings apply to one study')
  assert not any(tmp_path.iterdir())


def test_runs_a_study(tmp_path, study_data_dir):
  result = run_script('study.py', '--study=repro_fig1', '--steps=20', '--every=10', f'--out={tmp_path}',
                      f'--data_dir={study_data_dir}', timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert '| step | test accuracy without BN |' in result.stdout
  saved = json.loads((tmp_path / 'repro_fig1' / 'results.json').read_text())
  assert saved['settings']['steps'] == 20 and 'experiments/study.py --study=repro_fig1' in saved['command']
