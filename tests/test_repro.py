"""bnjax.lab.repro and experiments/repro.py: every study end to end at a tiny budget on generated data.

The studies' numbers are in docs/results.md (real data); here each study must run, write its
outputs, and show the invariants its design implies (e.g. BN momentum cannot change what
batch-statistics evaluation sees).
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from bnjax.lab import repro, studies
from conftest import REPO

QUIET = lambda message: None


@pytest.fixture(scope='module')
def data_dir(study_data_dir):
  return study_data_dir


def _run(name, tmp_path, data_dir, **overrides):
  results = studies.run_study(name, tmp_path, overrides=overrides, data_dir=data_dir, command='test', log=QUIET)
  out = tmp_path / name
  assert json.loads((out / 'results.json').read_text())['settings'] == results['settings']
  assert results['table'] in (out / 'table.md').read_text()
  assert results['environment']['platform'] == 'cpu'
  return results, out


def test_seed000_momentum_changes_moving_but_not_batch_statistics(tmp_path, data_dir):
  results, out = _run('repro_seed000', tmp_path, data_dir, epochs=2, seeds=[0])
  runs = results['results']
  assert list(runs) == ['plain', 'bn (momentum 0.99)', 'bn (momentum 0.9)', 'bn (momentum 0.6)']
  # Training normalizes with batch statistics: the momentum only changes the moving averages.
  batch = [runs[name]['test_accuracy_batch_stats'][0] for name in list(runs)[1:]]
  assert batch[0] == pytest.approx(batch[1], abs=1e-6) and batch[0] == pytest.approx(batch[2], abs=1e-6)
  moving = [runs[name]['test_accuracy'][0] for name in list(runs)[1:]]
  assert len(set(moving)) > 1
  assert [m['epoch'] for m in runs['plain']['mean_history']] == [1, 2]
  assert (out / 'seed000_curves.png').stat().st_size > 10_000 and (out / 'seed000_momentum.png').exists()
  assert '0.9793 ± 0.0007' in results['table']  # the source's reference beside ours


def test_bug_study_discarded_updates_leave_training_unchanged(tmp_path, data_dir):
  results, _ = _run('repro_bug', tmp_path, data_dir, epochs=2, seeds=[0])
  runs = results['results']
  usual, bug = runs['BN before ReLU (the usual order)'], runs[list(runs)[1]]
  assert 'update_stats=false' in list(runs)[1]
  # Discarding the updates changes nothing in training, so batch-statistics evaluation is identical.
  assert bug['test_accuracy_batch_stats'] == pytest.approx(usual['test_accuracy_batch_stats'], abs=1e-6)
  assert len(results['table'].splitlines()) == 2 + len(repro.BUG_VARIANTS)


def test_renorm_study_uses_the_papers_clipping_schedule_over_ghost_batches(tmp_path, data_dir):
  results, out = _run('repro_renorm', tmp_path, data_dir, epochs=1, seeds=[0], ghost_sizes=[2, 10], batch_size=50)
  configs = [r['config'] for r in results['results']]
  renorm = [c for c in configs if c['norm'] == 'renorm']
  assert {c['virtual_batch_size'] for c in renorm} == {2, 10}
  assert all(c['renorm_clipping'] == 'warmup' and c['rmax_end_step'] == c['steps'] == 100 for c in renorm)
  assert {c['virtual_batch_size'] for c in configs if c['norm'] == 'ghost'} == {2, 10}
  assert all(r['test_accuracy_moving_stats'] is not None for r in results['results'])
  assert (out / 'renorm.png').exists()


def test_momentum_batch_study_writes_both_heatmaps(tmp_path, data_dir):
  results, out = _run('repro_momentum_batch', tmp_path, data_dir, epochs=1, seeds=[0], momenta=[0.6, 0.99],
                      batch_sizes=[50, 250])
  rows = results['results']['rows']
  assert len(rows) == 2 * 3  # batch sizes x (two momenta + inverse decay)
  assert all(r['stats_gap'] == pytest.approx(r['test_accuracy_batch_stats'] - r['test_accuracy_moving_stats'])
             for r in rows)
  assert (out / 'momentum_batch_accuracy.png').exists() and (out / 'momentum_batch_stats_gap.png').exists()
  assert 'momentum inverse_decay' in results['table']


def test_dropout_study_measures_the_variance_shift_on_both_models(tmp_path, data_dir):
  results, out = _run('repro_dropout', tmp_path, data_dir, mlp_epochs=1, seeds=[0], rates=[0.5], cnn_epochs=1,
                      placements=['before_norm', 'end'])
  mlp = results['results']['mlp_seed (MNIST)']
  find = lambda runs, norm, placement: next(r for r in runs if r['config']['norm'] == norm
                                            and r['config']['dropout_placement'] == placement)
  assert find(mlp, 'none', 'end')['variance_shift'] == pytest.approx(1.0, abs=1e-5)
  assert find(mlp, 'none', 'before_norm')['variance_shift'] > 1.2
  assert len(find(mlp, 'bn', 'before_norm')['variance_shift_blocks']) == 6
  # At initialization the shift of dropout before BN compounds with depth (Li et al. 2019).
  at_init = find(mlp, 'bn', 'before_norm')['variance_shift_at_init_blocks']
  assert at_init[0] > 1.5 and at_init[-1] > 4 * at_init[0]
  assert find(mlp, 'bn', 'end')['variance_shift_at_init'] == pytest.approx(1.0, abs=1e-3)
  cnn = results['results']['cnn_seed (CIFAR-10)']
  assert {r['config']['dropout_placement'] for r in cnn} == {'before_norm', 'end'}
  assert len(find(cnn, 'bn', 'before_norm')['moving_variance_ratio_blocks']) == 7
  assert find(cnn, 'bn', 'before_norm')['variance_shift_blocks'][0] > 1.2  # its own dropout, block 0
  assert (out / 'dropout.png').exists()


def test_fig1_tracks_accuracy_and_percentiles_from_step_zero(tmp_path, data_dir):
  results, out = _run('repro_fig1', tmp_path, data_dir, steps=60, every=20)
  for norm in ('none', 'bn'):
    track = results['results']['tracks'][norm]
    assert track['step'] == [0, 20, 40, 60]
    for key in ('percentiles', 'percentiles_batch_stats'):
      p = np.asarray(track[key])
      assert p.shape == (4, 3) and np.all(p[:, 0] <= p[:, 1]) and np.all(p[:, 1] <= p[:, 2])
  # Without norm layers, inference and batch statistics are the same computation.
  none = results['results']['tracks']['none']
  np.testing.assert_allclose(none['percentiles'], none['percentiles_batch_stats'], rtol=1e-5, atol=1e-6)
  # Re-running reuses the tracks already measured with the same config.
  stamp = (out / 'track_bn.json').stat().st_mtime_ns
  studies.run_study('repro_fig1', tmp_path, overrides=dict(steps=60, every=20), data_dir=data_dir, log=QUIET)
  assert (out / 'track_bn.json').stat().st_mtime_ns == stamp


def test_seed003_compares_with_the_source_log_and_resumes(tmp_path, data_dir):
  results, out = _run('repro_seed003', tmp_path, data_dir, epochs=1)
  assert [m['epoch'] for m in results['results']['history']] == [1]
  assert '0.5887' in results['table'] and '(not run)' in results['table']
  results, _ = _run('repro_seed003', tmp_path, data_dir, epochs=2)  # continues from epoch 1's checkpoint
  assert [m['epoch'] for m in results['results']['history']] == [1, 2]
  assert (out / 'seed003_curves.png').exists()
  # Re-run shorter: refused in one line naming the run's folder (study.py has no --workdir), not a 2-epoch table.
  from bnjax.lab import rundir
  with pytest.raises(rundir.RunDirError, match=r'^\S+/repro_seed003/run holds a run of --epochs=2; this command asks '
                     '--epochs=1, shorter: pass --overwrite') as refused:
    _run('repro_seed003', tmp_path, data_dir, epochs=1)
  assert '--workdir' not in str(refused.value) and '\n' not in str(refused.value)
  results = studies.run_study('repro_seed003', tmp_path, overrides=dict(epochs=1), data_dir=data_dir, log=QUIET,
                              overwrite=True)
  assert [m['epoch'] for m in results['results']['history']] == [1]
  with pytest.raises(ValueError, match='--resume: .* holds no run of study repro_seed003'):
    studies.run_study('repro_seed003', tmp_path / 'elsewhere', data_dir=data_dir, log=QUIET, resume=True)


def test_settings_reject_unknown_names_and_budgets():
  assert studies.settings_for('repro_seed003', 'full')['epochs'] == 30
  assert studies.settings_for('repro_seed000', 'cpu', {'epochs': 3})['epochs'] == 3
  with pytest.raises(ValueError, match='no setting --epoch'):
    studies.settings_for('repro_seed000', 'cpu', {'epoch': 3})
  with pytest.raises(ValueError, match='--budget'):
    studies.settings_for('repro_seed000', 'gpu')
  with pytest.raises(ValueError, match='--study'):
    studies.settings_for('repro_fig2', 'cpu')


def test_every_study_has_both_budgets_with_the_same_settings():
  for study in studies.STUDIES.values():
    assert set(study.budgets) == set(studies.BUDGETS)
    assert set(study.budgets['cpu']) == set(study.budgets['full'])


def _cli(*args):
  return subprocess.run([sys.executable, 'experiments/repro.py', *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300)


def test_cli_rejects_bad_settings_before_any_work(tmp_path):
  result = _cli('--study=seed000', '--set=epoch=3', f'--out={tmp_path}')
  assert result.returncode == 2 and 'no setting --epoch' in result.stderr
  result = _cli('--study=all', '--epochs=3', f'--out={tmp_path}')
  assert result.returncode == 2 and 'settings apply to one study' in result.stderr
  assert not any(tmp_path.iterdir())


def test_cli_runs_a_study(tmp_path, data_dir):
  result = _cli('--study=fig1', '--steps=20', '--every=10', f'--out={tmp_path}', f'--data_dir={data_dir}')
  assert result.returncode == 0, result.stderr[-2000:]
  assert '| step | test accuracy without BN |' in result.stdout
  saved = json.loads((tmp_path / 'repro_fig1' / 'results.json').read_text())
  assert saved['settings']['steps'] == 20 and 'experiments/repro.py' in saved['command']


def test_steps_or_epochs_given_replaces_the_studys_other_length():
  settings = studies.settings_for('cifar_cnn', 'cpu', {'steps': '300'})
  assert settings['steps'] == 300 and 'epochs' not in settings
  settings = studies.settings_for('renorm', 'cpu', {'epochs': '2'})  # a grid study set in steps
  assert settings['epochs'] == 2 and 'steps' not in settings
  assert studies.settings_for('cifar_cnn', 'cpu', {'steps': '300', 'epochs': '2'})['epochs'] == 2  # both given: both
