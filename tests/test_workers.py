"""Sweeps shared by independent workers (bnjax.lab.sweep with bnjax.lab.storage claims): every run exactly once."""

import csv
import json
import os
import subprocess
import sys
import time

from bnjax.lab import config as C
from bnjax.lab import storage, sweep
from conftest import REPO

GRID = ['--batch_size=100,200,300,400', '--epochs=1', '--data_source=files', '--progress_updates=1', '--report=false']


def _start(data_dir, sweep_dir, *flags):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.Popen([sys.executable, str(REPO / 'experiments' / 'sweep.py'), f'--data_dir={data_dir}',
                           f'--sweep_dir={sweep_dir}', *GRID, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, cwd=REPO)


def _holders(sweep_dir):
  """Per group, the owners that held its claim (each holder writes one entry; releases are entries too)."""
  owners = {}
  for folder in (sweep_dir / 'claims').iterdir():
    entries = [json.loads(p.read_text()) for p in sorted(folder.glob('*.claim'))]
    owners[folder.name] = [e['owner'] for e in entries if not e.get('released')]
  return owners


def _check_every_run_once(sweep_dir):
  rows = list(csv.DictReader(open(sweep_dir / 'results.csv')))
  assert sorted(int(r['batch_size']) for r in rows) == [100, 200, 300, 400]
  assert all(r['status'] == 'completed' for r in rows)
  holders = _holders(sweep_dir)
  assert len(holders) == 4 and all(len(owners) == 1 for owners in holders.values()), holders


def test_two_workers_train_every_run_exactly_once(data_dir, tmp_path):
  workers = [_start(data_dir, tmp_path, '--num_workers=2', f'--worker_index={i}') for i in range(2)]
  outputs = [w.communicate(timeout=600) for w in workers]
  assert [w.returncode for w in workers] == [0, 0], [o[1][-2000:] for o in outputs]
  _check_every_run_once(tmp_path)
  owners = {owner for holders in _holders(tmp_path).values() for owner in holders}
  assert len({owner.split(':worker')[1] for owner in owners}) == 2  # both workers trained groups


def test_the_same_command_started_twice_shares_the_work(data_dir, tmp_path):
  workers = [_start(data_dir, tmp_path) for _ in range(2)]
  outputs = [w.communicate(timeout=600) for w in workers]
  assert [w.returncode for w in workers] == [0, 0], [o[1][-2000:] for o in outputs]
  _check_every_run_once(tmp_path)


def _configs(data_dir):
  base = C.make(dict(data_dir=str(data_dir), data_source='files', epochs=1, progress_updates=1))
  return sweep.expand_grid(base, {'batch_size': [100, 200]})[0]


def test_a_dead_workers_claim_is_taken_over_and_a_live_one_is_not(data_dir, tmp_path):
  configs = _configs(data_dir)
  folder = tmp_path / 'claims' / sweep.group_folder_name([configs[0]])
  held = storage.claim(folder, owner='dead-worker', stale_after=3600)
  log = []
  records = sweep.run_sweep(configs, tmp_path, report=False, claim_timeout=3600, log=log.append)
  assert [r['config']['batch_size'] for r in records] == [200]  # the claimed group was left to its worker
  assert 'claimed by another worker' in ''.join(log)
  storage.write_json_atomic(held.file, dict(held.record, heartbeat=time.time() - 7200))  # it died long ago
  records = sweep.run_sweep(configs, tmp_path, report=False, claim_timeout=3600, log=log.append)
  assert sorted(r['config']['batch_size'] for r in records) == [100, 200]
  assert held.still_owned() is False


def test_lanes_sharded_over_eight_devices_equal_one_device(data_dir, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, str(REPO / 'tests' / 'scripts' / 'sweep_devices_check.py'), str(data_dir),
                           str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count('ok ') == 2


def _free_port():
  import socket

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_a_sweep_over_two_processes_equals_one_process(data_dir, tmp_path):
  """jax.distributed on 127.0.0.1: 2 processes x 2 forced CPU devices; 3 lanes (1 padding) span all 4 devices.

  Process 0 alone writes the records (after a checkpoint per epoch, written by both through Orbax); both
  processes exit 0 with the same results; every number equals the same sweep in one process on one device
  (float tolerance). The sweep is the CLI's, run from its flags.
  """
  import pytest

  grid = ['--momentum=0.6,0.9,0.99', '--batch_size=100', '--epochs=2', '--data_source=files', '--progress_updates=1',
          '--report=false', '--dropout_placement=end', '--dropout_rate=0.2', f'--data_dir={data_dir}']
  base = C.make(dict(batch_size=100, epochs=2, data_source='files', progress_updates=1, dropout_placement='end',
                     dropout_rate=0.2, data_dir=str(data_dir)))
  configs, _ = sweep.expand_grid(base, {'momentum': [0.6, 0.9, 0.99]})
  sweep.run_sweep(configs, tmp_path / 'one', report=False, log=lambda message: None)  # one process, one device
  script = [sys.executable, str(REPO / 'experiments' / 'sweep.py'), *grid]
  env = lambda devices: dict(os.environ, JAX_PLATFORMS='cpu',
                             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={devices}')
  port = _free_port()
  processes = [subprocess.Popen(script + [f'--sweep_dir={tmp_path / "two"}', f'--coordinator_address=127.0.0.1:{port}',
                                          '--num_processes=2', f'--process_id={i}'],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(2), cwd=REPO)
               for i in range(2)]
  try:
    outputs = [p.communicate(timeout=600) for p in processes]
  except subprocess.TimeoutExpired:
    for p in processes:
      p.kill()
    pytest.fail('the two sweep processes did not finish in 600 s')
  for p, (out, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  assert 'on the 4 devices of 2 processes' in outputs[0][0] + outputs[0][1]
  assert 'results.csv: 3 completed' in outputs[0][0] and 'results.csv: 3 completed' in outputs[1][0]
  read = lambda name: {r['run_id']: r for r in csv.DictReader(open(tmp_path / name / 'results.csv'))}
  want, got = read('one'), read('two')
  assert sorted(got) == sorted(want) and len(got) == 3
  for run, row in want.items():
    for key in ('final_val_accuracy', 'test_accuracy_moving_stats', 'test_accuracy_batch_stats', 'variance_shift'):
      assert abs(float(got[run][key]) - float(row[key])) <= 0.01, (key, got[run][key], row[key])
  # Written once, by process 0: one metrics.jsonl line per epoch per run, no leftover claims or checkpoints.
  for run in got:
    assert len((tmp_path / 'two' / 'runs' / run / 'metrics.jsonl').read_text().splitlines()) == 2
  assert not list((tmp_path / 'two' / 'groups').glob('*/checkpoints/*'))


def test_a_worker_stopped_past_its_claim_timeout_writes_nothing_once_woken(data_dir, tmp_path):
  """SIGSTOP (SLURM's suspend, a paused VM) past --claim_timeout: another worker takes the group over, resumes
  from the stopped worker's checkpoint and finishes it; woken, the stopped worker finds its claim lost at its
  next write and stops the group: the new owner's record, metrics and cleaned-up folder stay as they are."""
  import signal

  timeout = 3.0
  flags = ['--momentum=0.9', '--epochs=8', '--batch_size=100', '--data_source=files', '--progress_updates=1',
           '--report=false', f'--claim_timeout={timeout}']
  stalled = subprocess.Popen([sys.executable, str(REPO / 'experiments' / 'sweep.py'), f'--data_dir={data_dir}',
                              f'--sweep_dir={tmp_path}', *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'), cwd=REPO)
  try:
    deadline = time.time() + 300
    while not list(tmp_path.glob('groups/*/checkpoints/2')) and stalled.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    stalled.send_signal(signal.SIGSTOP)
    assert stalled.poll() is None, stalled.communicate()[1][-2000:]
    time.sleep(timeout + 0.5)
    (config,) = sweep.expand_grid(C.make(dict(data_dir=str(data_dir), data_source='files', epochs=8, batch_size=100,
                                              momentum=0.9, progress_updates=1)), {})[0]
    log = []
    (record,) = sweep.run_sweep([config], tmp_path, report=False, claim_timeout=timeout, log=log.append)
    assert record['status'] == 'completed' and 'group resumed from the checkpoint of epoch' in ' '.join(log)
    written = {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file() and 'claims' not in p.parts}
  finally:
    stalled.send_signal(signal.SIGCONT)
  out, err = stalled.communicate(timeout=300)
  assert stalled.returncode == 0 and 'Traceback' not in err, err[-3000:]
  assert 'another worker took over its claim' in out, out
  after = {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file() and 'claims' not in p.parts}
  changed = [p for p in after if after[p] != written.get(p)]
  # The stalled worker's own TensorBoard file may still receive the events it had queued before the stop.
  theirs = sorted(tmp_path.glob('runs/*/events.out.tfevents.*'))[0]
  assert after.keys() == written.keys() and changed in ([], [theirs]), (changed, after.keys() ^ written.keys())
  assert not list(tmp_path.glob('groups/*/checkpoints/*'))
  metrics = (tmp_path / 'runs' / C.run_id(config) / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(l)['epoch'] for l in metrics] == list(range(1, 9))
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  resumed_at = int(next(m for m in log if 'resumed from the checkpoint' in m).split('epoch ')[1].split()[0])
  events = EventAccumulator(str(theirs))
  events.Reload()
  assert max(e.step for e in events.Scalars('val_accuracy')) <= resumed_at + 1  # nothing after the stop


def test_a_group_finished_between_a_workers_look_and_its_claim_is_not_trained_again(data_dir, tmp_path, monkeypatch):
  configs = _configs(data_dir)[:1]
  sweep.run_sweep(configs, tmp_path / 'other', report=False, log=lambda m: None)  # the other worker's records
  claim = storage.claim

  def claim_after_the_other_worker_finished(path, **kwargs):
    for record in (tmp_path / 'other' / 'runs').glob('*.json'):  # it wrote them while we were looking
      (tmp_path / 'ours' / 'runs' / record.name).write_bytes(record.read_bytes())
    return claim(path, **kwargs)

  monkeypatch.setattr(storage, 'claim', claim_after_the_other_worker_finished)
  log = []
  (record,) = sweep.run_sweep(configs, tmp_path / 'ours', report=False, log=log.append)
  assert 'group 1: finished by another worker meanwhile; skipped' in log
  assert record == json.loads(next((tmp_path / 'other' / 'runs').glob('*.json')).read_text())
  assert not (tmp_path / 'ours' / 'runs' / C.run_id(configs[0])).exists()  # no metrics, no config written
  (folder,) = (tmp_path / 'ours' / 'claims').iterdir()
  assert [storage.read_json(p).get('released', False) for p in sorted(folder.iterdir())] == [False, True]
