"""bnjax.lab.experiment: a whole run on small generated data, its outputs, resume, divergence, the stats bug."""

import json

import pytest

from bnjax.lab import config as C
from bnjax.lab import experiment, loop

QUIET = dict(progress=False, log=lambda message: None)
METRIC_KEYS = ('epoch', 'step', 'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy')


def _config(data_dir, workdir, **settings):
  base = dict(data_dir=str(data_dir), data_source='files', batch_size=50, epochs=2, workdir=str(workdir), progress_updates=2)
  return C.validate(C.TrainConfig(**{**base, **settings}))


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_a_run_writes_every_output(data_dir, tmp_path):
  summary = experiment.run(_config(data_dir, tmp_path), **QUIET)
  assert summary['status'] == 'completed'
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['config']['norm'] == 'bn' and config['environment']['jax']
  assert config['environment']['device_kind']
  lines = _metrics(tmp_path)
  assert [m['epoch'] for m in lines] == [1, 2]
  for key in METRIC_KEYS + ('seconds', 'examples_per_second'):
    assert key in lines[0]
  written = json.loads((tmp_path / 'summary.json').read_text())
  assert written['test_accuracy'] == summary['test_accuracy'] > 0.5
  assert written['best_val_accuracy'] >= written['final_val_accuracy']
  assert (tmp_path / 'curves.png').read_bytes()[:4] == b'\x89PNG'
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['1', '2']
  assert summary['test_accuracy_batch_stats'] is not None and summary['variance_shift'] is not None
  assert 0 < summary['final_eval_seconds'] < summary['total_seconds']
  # The optional end-of-run evaluations off: the same run, without those fields.
  lean = experiment.run(_config(data_dir, tmp_path / 'lean', test_batch_stats=False, variance_probes=False), **QUIET)
  assert lean['test_accuracy'] == summary['test_accuracy'] and lean['test_loss'] == summary['test_loss']
  assert lean['test_accuracy_batch_stats'] is None and lean['stats_gap'] is None and 'variance_shift' not in lean


def test_resume_after_an_interruption_equals_the_uninterrupted_run(data_dir, tmp_path):
  settings = dict(epochs=3, dropout_placement='end', dropout_rate=0.2)
  whole = experiment.run(_config(data_dir, tmp_path / 'whole', **settings), **QUIET)
  config = _config(data_dir, tmp_path / 'cut', **settings)
  with pytest.raises(loop.Interrupted):
    experiment.run(config, interrupt_after_epoch=1, **QUIET)
  assert len(_metrics(tmp_path / 'cut')) == 1
  resumed = experiment.run(config, resume=True, **QUIET)
  got = [{k: m[k] for k in METRIC_KEYS} for m in _metrics(tmp_path / 'cut')]
  want = [{k: m[k] for k in METRIC_KEYS} for m in _metrics(tmp_path / 'whole')]
  assert got == want
  assert resumed['test_accuracy'] == whole['test_accuracy']
  assert resumed['test_loss'] == whole['test_loss']


def test_a_diverging_run_ends_with_status_diverged(data_dir, tmp_path):
  config = _config(data_dir, tmp_path, optimizer='sgd', learning_rate=1e4, norm='none', epochs=3)
  summary = experiment.run(config, **QUIET)
  assert summary['status'] == 'diverged'
  assert 'diverged in epoch' in summary['message'] and '\n' not in summary['message']
  assert json.loads((tmp_path / 'summary.json').read_text())['status'] == 'diverged'


def test_moving_statistics_bug_ruins_evaluation_but_not_batch_statistics(data_dir, tmp_path):
  correct = experiment.run(_config(data_dir, tmp_path / 'ok'), **QUIET)
  bug = experiment.run(_config(data_dir, tmp_path / 'bug', update_stats=False), **QUIET)
  batch_eval = experiment.run(_config(data_dir, tmp_path / 'batch', update_stats=False, eval_stats='batch'), **QUIET)
  assert correct['test_accuracy_moving_stats'] > 0.7
  assert bug['test_accuracy_moving_stats'] < correct['test_accuracy_moving_stats'] - 0.25
  assert batch_eval['test_accuracy'] > 0.7  # the batch's own statistics do not need the moving ones
  assert batch_eval['test_accuracy'] == batch_eval['test_accuracy_batch_stats']


def test_ghost_and_renorm_runs_complete(data_dir, tmp_path):
  for settings in (dict(norm='ghost', virtual_batch_size=10), dict(norm='renorm', renorm_clipping='warmup',
                   renorm_warmup_steps=5, rmax_end_step=20, dmax_end_step=15)):
    summary = experiment.run(_config(data_dir, tmp_path / settings['norm'], **settings), **QUIET)
    assert summary['status'] == 'completed' and summary['test_accuracy'] > 0.5, (settings, summary)
