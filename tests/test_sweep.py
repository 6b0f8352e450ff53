"""Sweeps: grids, grouping, vmapped == sequential, safety (divergence, errors, resume after a kill), CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.lab import build, engine, experiment, loop, sweep
from bnjax.lab import config as C
from bnjax.lab.config import TrainConfig
from conftest import REPO


def tiny(data_dir, **overrides) -> TrainConfig:
  return TrainConfig(**{**dict(data_dir=str(data_dir), data_source='files', batch_size=100, epochs=1, progress_updates=1,
                                checkpoint_every=0), **overrides})


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


# ----------------------------------------------------------------------------
# Grids and groups.


def test_parse_values_types_after_the_field():
  assert C.parse_values('momentum', '0.6, 0.9') == [0.6, 0.9]
  assert C.parse_values('batch_size', '32,128') == [32, 128]
  assert C.parse_values('debias', 'true,false') == [True, False]
  assert C.parse_values('virtual_batch_size', 'none,4') == [None, 4]
  assert C.parse_values('dropout_placement', 'none,end') == ['none', 'end']
  with pytest.raises(ValueError, match='unknown setting'):
    C.parse_values('momentom', '0.9')


def test_expand_grid_drops_unused_options_and_deduplicates():
  configs, notes = sweep.expand_grid(TrainConfig(), {'norm': ['bn', 'renorm'], 'rmax': [1.0, 3.0]})
  assert [(c.norm, c.rmax) for c in configs] == [('bn', 3.0), ('renorm', 1.0), ('renorm', 3.0)]
  assert len(notes) == 1 and 'merged' in notes[0]
  configs, notes = sweep.expand_grid(
      TrainConfig(), {'dropout_placement': ['none', 'end'], 'dropout_rate': [0.2, 0.5],
                      'momentum_schedule': ['constant', 'inverse_decay'], 'momentum': [0.9, 0.99]})
  # none: rate 0 (1) ; end: 2 rates; each x (2 constant momenta + 1 inverse decay).
  assert len(configs) == 3 * 3
  configs, notes = sweep.expand_grid(TrainConfig(), {'batch_size': [500, 0]})
  assert len(configs) == 1 and 'skipped' in notes[0] and 'batch_size' in notes[0]


def test_run_id_is_stable_and_ignores_outputs():
  a = TrainConfig(momentum=0.9)
  assert C.run_id(a) == C.run_id(dataclasses.replace(a, workdir='x', progress_updates=3, data_dir='/d'))
  assert C.run_id(a) != C.run_id(dataclasses.replace(a, momentum=0.99))
  assert C.run_id(a) == '%s' % C.run_id(TrainConfig(momentum=0.9))


def test_grouping_values_together_structure_apart():
  configs, _ = sweep.expand_grid(TrainConfig(), {
      'momentum': [0.6, 0.9], 'momentum_schedule': ['constant', 'inverse_decay'], 'batch_size': [32, 500],
      'learning_rate': [1e-3, 1e-2], 'seed': [0, 1], 'norm': ['bn', 'none']})
  groups = sweep.group_runs(configs)
  # per batch size: bn-constant (2 momenta x 2 lr x 2 seeds), bn-inverse_decay (4), none (4).
  assert sorted(len(g) for g in groups) == [4, 4, 4, 4, 8, 8], [len(g) for g in groups]
  for members in groups:
    for field in ('batch_size', 'norm', 'momentum_schedule'):
      assert len({getattr(c, field) for c in members}) == 1
  assert [len(g) for g in sweep.group_runs(configs, max_group_size=3)].count(3) == 8


def test_a_groups_structure_is_read_from_the_option_table():
  config = C.canonical(TrainConfig(batch_size=128, momentum=0.9))
  structure = sweep.group_structure(config)
  assert structure['batch_size'] == 128  # off its default: part of the group key
  assert 'momentum' not in structure  # a value: the lanes of a group vary it
  assert {'model', 'norm', 'dropout_placement'} <= set(structure)  # the model's structure options
  assert 'epochs' not in structure and sweep.group_structure(config, shown={'epochs'})['epochs'] == config.epochs


def test_conv_groups_train_one_run_at_a_time_on_cpu_only():
  mlp, _ = sweep.expand_grid(TrainConfig(), {'momentum': [0.6, 0.9]})
  cnn, _ = sweep.expand_grid(TrainConfig(dataset='cifar10', model='cifar_cnn'), {'momentum': [0.6, 0.9, 0.99]})
  groups = sweep.group_runs(mlp + cnn)
  assert sorted(len(g) for g in groups) == [2, 3]
  assert sorted(len(g) for g in sweep.one_run_per_conv_group(groups, 'cpu')) == [1, 1, 1, 2]
  assert sorted(len(g) for g in sweep.one_run_per_conv_group(groups, 'gpu')) == [2, 3]


def test_renorm_clipping_schedule_is_structure():
  constant = TrainConfig(norm='renorm', rmax=2.0)
  assert C.model_values(constant) == ('momentum', 'renorm_momentum', 'rmax', 'dmax')
  warmup = dataclasses.replace(constant, renorm_clipping='warmup')
  assert 'rmax' not in C.model_values(warmup)
  assert sweep.group_key(warmup) != sweep.group_key(dataclasses.replace(warmup, rmax=3.0))
  assert sweep.group_key(constant) == sweep.group_key(dataclasses.replace(constant, rmax=3.0))


# ----------------------------------------------------------------------------
# Vmapped == sequential.


def sequential_state(config, dataset):
  """The engine's single-run path, written out: build.optimizer (lr as injected), one scan per epoch."""
  num_train = dataset.train_images.shape[0]
  model = build.model(config)
  optimizer = build.optimizer(config, build.total_steps(config, num_train))
  state = engine.init_train_state(model, optimizer, config.seed, dataset.train_images[:1])
  steps = jax.jit(engine.make_train_steps(model, optimizer))
  for epoch in range(config.epochs):
    state, _ = steps(state, dataset.train_images, dataset.train_labels,
                     engine.epoch_batches(state, epoch, num_train, config.batch_size))
  return state


def test_vmapped_group_equals_sequential_runs(data_dir):
  # SGD: rounding noise is not amplified (Adam's normalization can); momenta, learning rates, seeds differ.
  base = tiny(data_dir, optimizer='sgd', epochs=1, dropout_placement='end', dropout_rate=0.2)
  configs = [dataclasses.replace(base, momentum=m, learning_rate=lr, seed=seed, dropout_rate=rate)
             for m, lr, seed, rate in [(0.5, 0.02, 1, 0.2), (0.95, 0.02, 1, 0.2), (0.5, 0.01, 2, 0.2), (0.5, 0.01, 2, 0.3)]]
  assert len(sweep.group_runs(configs)) == 1
  dataset = build.dataset(configs[0], put=jax.device_put)
  records, states = sweep.train_group(configs, dataset)
  finals = []
  for lane, config in enumerate(configs):
    reference = sequential_state(config, dataset)
    lane_state = jax.tree.map(lambda a: a[lane], states)
    finals.append(float(lane_state.params['linear_0']['kernel'][0, 0]))
    # Lane 3's dropout rate differs from the rate the model was built with: a traced rate gives the
    # model's dropout slightly different numbers than the static one (~1e-3 after an epoch): metrics only.
    tolerance = dict(rtol=1e-4, atol=1e-5) if lane < 3 else dict(rtol=0.0, atol=3e-3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tolerance),
                 (lane_state.params, lane_state.batch_stats), (reference.params, reference.batch_stats))
    if lane != 3:
      continue  # the end-to-end single-run path, for two lanes (time)
    summary = experiment.run(config, dataset=dataset, progress=False, log=lambda _: None)
    for key in ('final_val_accuracy', 'best_val_accuracy', 'final_train_accuracy', 'test_accuracy_moving_stats',
                'test_accuracy_batch_stats'):
      assert records[lane][key] == pytest.approx(summary[key], abs=2.6e-3), key  # at most one example of 400
  # Each lane really trained with its own values.
  # BN momentum changes only the moving statistics; learning rate, seed and dropout rate the parameters.
  assert finals[0] == pytest.approx(finals[1], abs=1e-6) and len(set(np.round(finals[1:], 6))) == 3
  moving_means = [float(jnp.sum(states.batch_stats['norm_0']['mean'][lane])) for lane in range(len(configs))]
  assert len(set(np.round(moving_means, 5))) == len(configs)
  assert records[0]['history'][-1]['epoch'] == 1


def test_diverged_lane_does_not_stop_the_others(data_dir):
  configs, _ = sweep.expand_grid(tiny(data_dir, optimizer='sgd', norm='none'), {'learning_rate': [1e30, 0.05]})
  dataset = build.dataset(configs[0], put=jax.device_put)
  records, _ = sweep.train_group(configs, dataset, dataclasses.replace(sweep.GROUP_SETTINGS, log=lambda _: None))
  assert records[0]['status'] == loop.STATUS_DIVERGED and records[0]['diverged_epoch'] == 1
  assert records[1]['status'] == loop.STATUS_COMPLETED and np.isfinite(records[1]['test_accuracy_moving_stats'])


# ----------------------------------------------------------------------------
# The sweep: files, errors, resume.


def test_sweep_writes_results_records_errors_and_resumes(data_dir, tmp_path):
  configs, _ = sweep.expand_grid(tiny(data_dir), {'momentum': [0.6, 0.9], 'batch_size': [100, 200]})
  configs.append(tiny(data_dir, batch_size=5000))  # a group that raises: batch larger than the training set
  log = []
  with pytest.raises(sweep.Interrupted):
    sweep.run_sweep(configs, tmp_path, interrupt_after_groups=1, report=False, log=log.append)
  first = read_csv(tmp_path / 'results.csv')
  assert len(first) == 2  # the first group: two momenta
  records = sweep.run_sweep(configs, tmp_path, log=log.append)
  assert '2 already finished' in ''.join(log)
  rows = read_csv(tmp_path / 'results.csv')
  assert sorted(r['run_id'] for r in rows) == sorted({C.run_id(c) for c in configs})
  assert len(rows) == len(configs) == len(records) == 5
  statuses = {r['run_id']: r['status'] for r in rows}
  assert statuses[C.run_id(configs[-1])] == sweep.STATUS_ERROR
  assert 'larger than' in next(r['error'] for r in rows if r['status'] == 'error')
  assert list(statuses.values()).count('completed') == 4
  done = next(r for r in rows if r['status'] == 'completed')
  assert float(done['test_accuracy_moving_stats']) > 0.2 and done['momentum'] and done['val_accuracy_curve'].startswith('[')
  assert (tmp_path / 'report.md').exists()
  # A third run trains nothing that finished; the run that raised is tried again (and raises again).
  before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'runs').iterdir()}
  log.clear()
  sweep.run_sweep(configs, tmp_path, report=False, log=log.append)
  after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'runs').iterdir()}
  failed = f'{C.run_id(configs[-1])}.json'
  kept = lambda files: {k: v for k, v in files.items() if k not in (failed, failed[:-len('.json')])}
  assert kept(before) == kept(after)
  assert after[failed] != before[failed] and '4 already finished, 1 to train' in ''.join(log)
  # The folder re-used by another command: its results.csv and report hold that command's runs only.
  log.clear()
  sweep.run_sweep(configs[:2], tmp_path, report=False, log=log.append)
  assert [r['run_id'] for r in read_csv(tmp_path / 'results.csv')] == [C.run_id(c) for c in configs[:2]]
  assert '3 other run(s) recorded' in ''.join(log)


def test_a_sweep_killed_mid_group_resumes_that_group_to_the_same_numbers(data_dir, tmp_path):
  configs, _ = sweep.expand_grid(tiny(data_dir, epochs=3, optimizer='adam'), {'momentum': [0.6, 0.9]})
  whole = sweep.run_sweep(configs, tmp_path / 'whole', report=False, log=lambda m: None)
  with pytest.raises(loop.Interrupted):
    sweep.run_sweep(configs, tmp_path / 'cut', interrupt_after_epoch=2, report=False, log=lambda m: None)
  assert list((tmp_path / 'cut' / 'groups').iterdir())  # the group's checkpoint
  log = []
  resumed = sweep.run_sweep(configs, tmp_path / 'cut', report=False, log=log.append)
  assert 'group resumed from the checkpoint of epoch 2' in ''.join(log)
  drop_time = lambda h: [{k: v for k, v in m.items() if 'second' not in k} for m in h]
  for a, b in zip(whole, resumed):
    assert drop_time(a['history']) == drop_time(b['history'])
    assert a['test_accuracy_moving_stats'] == b['test_accuracy_moving_stats']
  assert not (tmp_path / 'cut' / 'groups').exists() or not list((tmp_path / 'cut' / 'groups').iterdir())
  lines = (tmp_path / 'cut' / 'runs' / C.run_id(configs[0]) / 'metrics.jsonl').read_text().splitlines()
  assert len(lines) == 3  # the lane's metrics: the kept epochs and the resumed ones, once each


def test_a_group_that_fills_the_disk_keeps_its_checkpoints_and_its_rerun_resumes(data_dir, small_disk, monkeypatch):
  """The disk fills before the group's second checkpoint: its runs are recorded as errors, its first checkpoint
  stays, and once room is made the same sweep resumes the group there (not from epoch 0), each epoch once."""
  from bnjax.lab import rundir

  disk, fill = small_disk
  configs, _ = sweep.expand_grid(tiny(data_dir, epochs=3, checkpoint_every=1), {'momentum': [0.6, 0.9]})
  save = rundir.Checkpoints.save

  def save_on_a_full_disk(self, epoch, state, histories):
    if epoch == 2:
      fill(left=1 << 20)  # room for records and metrics, not for a checkpoint
    return save(self, epoch, state, histories)

  monkeypatch.setattr(rundir.Checkpoints, 'save', save_on_a_full_disk)
  records = sweep.run_sweep(configs, disk / 'sweep', report=False, log=lambda m: None)
  assert [r['status'] for r in records] == ['error', 'error'] and 'no room for a checkpoint' in records[0]['error']
  assert [p.name for p in (disk / 'sweep').glob('groups/*/checkpoints/*')] == ['1']
  monkeypatch.undo()
  (disk / 'filler').unlink()
  log = []
  records = sweep.run_sweep(configs, disk / 'sweep', report=False, log=log.append)
  assert [r['status'] for r in records] == ['completed', 'completed']
  assert 'group resumed from the checkpoint of epoch 1' in ' '.join(log)
  for config in configs:
    lines = (disk / 'sweep' / 'runs' / C.run_id(config) / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(l)['epoch'] for l in lines] == [1, 2, 3]


# ----------------------------------------------------------------------------
# The CLI.


def cli(*args, cwd=REPO):
  return subprocess.run([sys.executable, str(REPO / 'experiments' / 'sweep.py'), *args],
                        capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_dry_run_lists_groups(tmp_path):
  result = cli('--momentum=0.6,0.9,0.99', '--batch_size=32,128,500', '--dropout_placement=none,before_norm,end',
               '--dropout_rate=0.5', '--norm=bn,renorm', '--rmax=1,3', '--seeds=0,1,2', '--dry_run',
               f'--sweep_dir={tmp_path}')
  assert result.returncode == 0, result.stderr
  # 3 momenta x 3 batch x 3 placements x (bn + renorm x 2 rmax) x 3 seeds; groups: batch x placement x norm.
  assert '243 runs in 18 group(s)' in result.stdout
  assert result.stdout.count('merged') == 81  # bn runs with rmax=1: rmax is a renorm option
  assert result.stdout.count(' 9 run(s)') == 9 and result.stdout.count('18 run(s)') == 9
  assert 'lanes vary: momentum, rmax, seed' in result.stdout


def test_cli_tiny_run(data_dir, tmp_path):
  result = cli('--momentum=0.6,0.9', f'--data_dir={data_dir}', '--data_source=files', '--batch_size=100',
               '--epochs=1', f'--sweep_dir={tmp_path / "grid"}')
  assert result.returncode == 0, result.stderr + result.stdout
  assert len(read_csv(tmp_path / 'grid' / 'results.csv')) == 2
  assert '--momentum=0.6,0.9' in (tmp_path / 'grid' / 'report.md').read_text()
