"""bnjax.lab.rundir: a folder holds one run; resume continues only that run; outputs per epoch."""

import json
import os
import shutil
import socket
import subprocess
import sys
import types

import pytest

from bnjax.lab import config as C
from bnjax.lab import experiment, rundir
from conftest import REPO, run_script


def _config(data_dir, workdir, **settings):
  return C.make(dict(dict(data_dir=str(data_dir), data_source='files', batch_size=100, epochs=1, progress_updates=1,
                          workdir=str(workdir)), **settings))


def test_a_new_run_in_a_used_folder_is_refused_and_overwrite_starts_clean(data_dir, tmp_path):
  first = experiment.run(_config(data_dir, tmp_path), progress=False, log=lambda m: None)
  other = _config(data_dir, tmp_path, seed=1)
  with pytest.raises(rundir.RunDirError, match='already holds run .*--resume.*--overwrite'):
    experiment.run(other, progress=False)
  second = experiment.run(other, overwrite=True, progress=False, log=lambda m: None)
  assert second['final_val_accuracy'] != first['final_val_accuracy']
  # Resuming the replaced folder continues seed 1's run, never seed 0's checkpoints.
  resumed = experiment.run(_config(data_dir, tmp_path, seed=1, epochs=2), resume=True, progress=False,
                           log=lambda m: None)
  history = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert history[0]['val_accuracy'] == second['final_val_accuracy'] and resumed['epochs_completed'] == 2


def test_resume_names_the_settings_that_differ(data_dir, tmp_path):
  experiment.run(_config(data_dir, tmp_path), progress=False, log=lambda m: None)
  with pytest.raises(rundir.RunDirError, match=r"batch_size=100 \(this command: 50\) in its config.json"):
    experiment.run(_config(data_dir, tmp_path, batch_size=50), resume=True, progress=False)
  with pytest.raises(rundir.RunDirError, match="norm='bn' \\(this command: 'renorm'\\)"):
    experiment.run(_config(data_dir, tmp_path, norm='renorm'), resume=True, progress=False)
  # Settings that don't change results, and a longer run at a constant learning rate, may change.
  experiment.run(_config(data_dir, tmp_path, epochs=2, progress_updates=3), resume=True, progress=False,
                 log=lambda m: None)
  with pytest.raises(rundir.RunDirError, match='epochs=2 \\(this command: 3\\)'):
    experiment.run(_config(data_dir, tmp_path, epochs=3, lr_schedule='cosine'), resume=True, progress=False)


QUIET = dict(progress=False, log=lambda m: None)
TRAJECTORY = ('epoch', 'step', 'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy')


def _trajectory(workdir):
  return [{k: m[k] for k in TRAJECTORY} for m in map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())]


def test_a_run_extended_by_resume_equals_the_uninterrupted_longer_run(data_dir, tmp_path):
  experiment.run(_config(data_dir, tmp_path / 'short'), **QUIET)
  extended = experiment.run(_config(data_dir, tmp_path / 'short', epochs=2), resume=True, **QUIET)
  whole = experiment.run(_config(data_dir, tmp_path / 'whole', epochs=2), **QUIET)
  assert _trajectory(tmp_path / 'short') == _trajectory(tmp_path / 'whole')
  assert (extended['test_accuracy'], extended['test_loss']) == (whole['test_accuracy'], whole['test_loss'])
  assert json.loads((tmp_path / 'short' / 'config.json').read_text())['config']['epochs'] == 2


def test_resume_refuses_a_shorter_run_and_a_longer_one_from_inside_an_epoch(data_dir, tmp_path):
  experiment.run(_config(data_dir, tmp_path, epochs=2), **QUIET)
  with pytest.raises(rundir.RunDirError, match='holds a run of --epochs=2; this command asks --epochs=1, shorter'):
    experiment.run(_config(data_dir, tmp_path, epochs=1), resume=True, **QUIET)
  assert json.loads((tmp_path / 'config.json').read_text())['config']['epochs'] == 2
  # --steps=3 ends inside the first epoch: its checkpoint is of step 3, not of a whole epoch.
  partial = tmp_path / 'partial'
  experiment.run(_config(data_dir, partial, steps=3, epochs=20), **QUIET)
  assert _trajectory(partial)[-1]['step'] == 3
  with pytest.raises(rundir.RunDirError, match=r'ended inside an epoch \(step 3; epochs are \d+ steps\)'):
    experiment.run(_config(data_dir, partial, steps=6, epochs=20), resume=True, **QUIET)
  with pytest.raises(rundir.RunDirError, match='shorter'):
    experiment.run(_config(data_dir, partial, steps=2, epochs=20), resume=True, **QUIET)
  # In steps against the checkpoint when the lengths are given in different units (--epochs against --steps).
  plan = types.SimpleNamespace(total_steps=2, steps_per_epoch=10)
  with pytest.raises(rundir.RunDirError, match='after 3 steps; this command asks 2'):
    rundir.check_resumed_length(partial, 3, plan)


def test_a_folder_left_before_the_first_checkpoint_is_started_again_by_the_same_command(data_dir, tmp_path):
  config = _config(data_dir, tmp_path, precise_bn=10**9)
  rundir.RunFolder(tmp_path, config).write_config({})       # killed while the data loaded: config.json only
  (tmp_path / 'metrics.jsonl').write_text('')
  summary = experiment.run(config, **QUIET)
  assert summary['status'] == 'completed' and len(_trajectory(tmp_path)) == 1
  # --precise_bn beyond the training set is capped, and the cap recorded.
  epoch_steps = _trajectory(tmp_path)[0]['step']
  assert summary['precise_bn_examples'] == epoch_steps * config.batch_size
  other = tmp_path / 'other'
  rundir.RunFolder(other, _config(data_dir, other, seed=3)).write_config({})
  with pytest.raises(rundir.RunDirError, match='already holds run'):
    experiment.run(_config(data_dir, other), **QUIET)
  rundir.RunFolder(other, _config(data_dir, other)).write_config({})
  assert experiment.run(_config(data_dir, other), resume=True, **QUIET)['status'] == 'completed'


def test_checkpoints_without_config_json_are_named_as_such(data_dir, tmp_path):
  experiment.run(_config(data_dir, tmp_path), **QUIET)
  (tmp_path / 'config.json').unlink()
  for resume in (False, True):
    with pytest.raises(rundir.RunDirError, match='has checkpoints but no config.json'):
      experiment.run(_config(data_dir, tmp_path), resume=resume, **QUIET)


def test_resume_without_a_checkpoint_and_a_file_for_a_folder(data_dir, tmp_path):
  with pytest.raises(rundir.RunDirError, match='no checkpoint to continue'):
    experiment.run(_config(data_dir, tmp_path / 'empty'), resume=True, progress=False)
  (tmp_path / 'file').write_text('x')
  with pytest.raises(rundir.RunDirError, match='is a file'):
    experiment.run(_config(data_dir, tmp_path / 'file'), progress=False)


def test_tensorboard_events_hold_every_epoch_and_the_config(data_dir, tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  experiment.run(_config(data_dir, tmp_path, epochs=2), progress=False, log=lambda m: None)
  events = EventAccumulator(str(tmp_path))
  events.Reload()
  assert [e.step for e in events.Scalars('val_accuracy')] == [1, 2]
  metrics = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [round(e.value, 5) for e in events.Scalars('val_accuracy')] == [round(m['val_accuracy'], 5) for m in metrics]
  assert 'config' in ''.join(events.Tags()['tensors'])


# ----------------------------------------------------------------------------
# The cases through the CLI: exit code, one line naming the flag, no debris.


def test_cli_new_run_into_a_used_workdir_then_resume_uses_the_right_run(data_dir, tmp_path):
  common = [f'--data_dir={data_dir}', '--data_source=files', '--batch_size=100', '--progress=false',
            f'--workdir={tmp_path}']
  assert run_script('train.py', *common, '--epochs=1').returncode == 0
  refused = run_script('train.py', *common, '--epochs=1', '--seed=1')
  assert refused.returncode == 2 and refused.stderr.strip().startswith('error: --workdir=')
  assert len(refused.stderr.strip().splitlines()) == 1 and 'Traceback' not in refused.stderr
  mismatch = run_script('train.py', *common, '--epochs=2', '--seed=1', '--resume')
  assert mismatch.returncode == 2 and 'seed=0 (this command: 1)' in mismatch.stderr


# ----------------------------------------------------------------------------
# One writer per folder; damaged checkpoints; a full disk (issue 27).


def test_one_process_per_folder_and_the_second_is_told_who_holds_it(tmp_path):
  folder = tmp_path / 'run'
  take = [sys.executable, '-c', f'from bnjax.lab import rundir; rundir.lock_folder({str(folder)!r}); print("locked")']
  other = lambda: subprocess.run(take, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                                 timeout=120)
  assert rundir.lock_folder(folder) and not rundir.lock_folder(folder)  # taken; taken again by its holder: no change
  try:
    refused = other()
    assert refused.returncode == 1 and f'is in use by {os.getpid()}@{socket.gethostname()}' in refused.stderr
  finally:
    rundir.unlock_folder(folder)
  assert other().stdout == 'locked\n'  # released; and a lock dies with its process
  rundir.unlock_folder(tmp_path / 'never-locked')  # nothing to release: nothing happens
  # A run that fails before writing anything leaves none of the folders its lock made.
  rundir.lock_folder(tmp_path / 'new' / 'study' / 'plain')
  rundir.lock_folder(tmp_path / 'new' / 'study' / 'bn')
  rundir.unlock_all_folders()
  assert not (tmp_path / 'new').exists() and (folder / rundir.LOCK_FILE).exists()


def test_cli_two_processes_racing_on_one_workdir(data_dir, tmp_path):
  """Two new runs started at once into one new workdir, then two --resume of it at once: one of each pair
  trains, the other is refused in one line naming the holder before writing anything."""
  common = [f'--data_dir={data_dir}', '--data_source=files', '--batch_size=100', '--progress=false',
            f'--workdir={tmp_path}']

  def race(*flags_per_process):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    processes = [subprocess.Popen([sys.executable, str(REPO / 'experiments' / 'train.py'), *common, *flags],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
                 for flags in flags_per_process]
    results = [(p, *p.communicate(timeout=300)) for p in processes]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, _, err in results]
    winner = next(i for i, (p, _, _) in enumerate(results) if p.returncode == 0)
    loser = results[1 - winner][2].strip().splitlines()
    assert len(loser) == 1 and loser[0].startswith(f'error: --workdir={tmp_path} is in use by '), loser
    return winner

  winner = race(['--epochs=2', '--seed=0'], ['--epochs=2', '--seed=1'])
  assert json.loads((tmp_path / 'config.json').read_text())['config']['seed'] == winner
  assert [json.loads(l)['epoch'] for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()] == [1, 2]
  race(['--epochs=3', f'--seed={winner}', '--resume'], ['--epochs=3', f'--seed={winner}', '--resume'])
  assert [json.loads(l)['epoch'] for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()] == [1, 2, 3]


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """A 3-epoch run (checkpoints of epochs 2 and 3), copied by the tests that damage or resume it."""
  folder = tmp_path_factory.mktemp('trained') / 'run'
  experiment.run(_config(data_dir, folder, epochs=3), progress=False, log=lambda m: None)
  return folder


def _copy(trained, tmp_path):
  folder = tmp_path / 'run'
  shutil.copytree(trained, folder)
  return folder


def _metrics(folder):
  return [{k: v for k, v in json.loads(l).items() if 'second' not in k}
          for l in (folder / 'metrics.jsonl').read_text().splitlines()]


def _truncate_arrays(step):
  for path in (step / 'state' / 'ocdbt.process_0' / 'd').iterdir():
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt_history(step):
  (step / 'history' / 'metadata').write_text('{"lanes": [[{"epoch": 1, ')


@pytest.mark.parametrize('damage', [_truncate_arrays, _corrupt_history], ids=['truncated array', 'corrupt history'])
def test_a_damaged_checkpoint_is_named_and_the_one_before_it_is_used(damage, data_dir, trained, tmp_path):
  folder = _copy(trained, tmp_path)
  damage(folder / 'checkpoints' / '3')
  log = []
  summary = experiment.run(_config(data_dir, folder, epochs=3), resume=True, progress=False, log=log.append)
  named = [m for m in log if m.startswith('the checkpoint of epoch')]
  assert len(named) == 1 and '\n' not in named[0], log
  assert named[0].startswith(f'the checkpoint of epoch 3 in {folder / "checkpoints"} is damaged (')
  assert 'resumed from the checkpoint of epoch 2' in ' '.join(log)
  assert _metrics(folder) == _metrics(trained)  # epoch 3 trained again: no line lost or duplicated
  assert summary['test_accuracy'] == json.loads((trained / 'summary.json').read_text())['test_accuracy']
  assert len(list((folder / 'checkpoints-damaged').iterdir())) == 1  # kept aside for inspection
  # Every checkpoint damaged: one line, nothing resumed from a broken state.
  for step in (folder / 'checkpoints').iterdir():
    _corrupt_history(step)
  with pytest.raises(rundir.RunDirError, match='holds no intact checkpoint.*--overwrite'):
    experiment.run(_config(data_dir, folder, epochs=3), resume=True, progress=False, log=lambda m: None)


def test_a_disk_full_during_a_checkpoint_keeps_the_previous_one(data_dir, trained, small_disk, monkeypatch):
  """The disk fills before epoch 2's checkpoint; the free-space check is bypassed so that the writes themselves
  fail (as when another process fills the disk meanwhile). Epoch 1's checkpoint survives, and the run resumed
  there, once room is made, ends with the numbers of the uninterrupted run."""
  disk, fill = small_disk
  folder = disk / 'run'
  save = rundir.Checkpoints.save

  def save_on_a_full_disk(self, epoch, state, histories):
    if epoch == 2:
      fill()
    return save(self, epoch, state, histories)

  monkeypatch.setattr(rundir.Checkpoints, 'save', save_on_a_full_disk)
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
  with pytest.raises(Exception):  # noqa: B017  (Orbax's error of a full disk; the CLI words it in one line)
    experiment.run(_config(data_dir, folder, epochs=3), progress=False, log=lambda m: None)
  monkeypatch.undo()
  assert sorted(p.name for p in (folder / 'checkpoints').iterdir()) == ['1']  # nothing partial, nothing lost
  (disk / 'filler').unlink()
  log = []
  experiment.run(_config(data_dir, folder, epochs=3), resume=True, progress=False, log=log.append)
  assert 'resumed from the checkpoint of epoch 1' in ' '.join(log)
  assert _metrics(folder) == _metrics(trained)


def test_a_stop_during_a_checkpoint_save_takes_effect_once_it_is_complete(tmp_path):
  import signal

  import jax.numpy as jnp

  from bnjax.lab import signals

  state, history = {'w': jnp.arange(3.0)}, [[{'epoch': 1}]]
  checkpoints = rundir.Checkpoints(tmp_path / 'checkpoints')
  save = checkpoints.manager.save

  def save_interrupted(*args, **kwargs):
    signal.raise_signal(signal.SIGTERM)  # arrives as Orbax starts writing
    return save(*args, **kwargs)

  checkpoints.manager.save = save_interrupted
  before = {signum: signal.getsignal(signum) for signum in signals.HANDLED}
  signals.install()
  try:
    with pytest.raises(signals.Stopped, match='SIGTERM'):
      checkpoints.save(1, state, history)
  finally:
    for signum, handler in before.items():
      signal.signal(signum, handler)
    checkpoints.close()
  epoch, restored, histories = rundir.Checkpoints(tmp_path / 'checkpoints').restore(state)
  assert epoch == 1 and restored['w'].tolist() == [0.0, 1.0, 2.0] and histories == history


def test_a_checkpoint_of_another_state_layout_is_refused_in_one_line_and_kept(tmp_path):
  """E.g. a run folder of a bnjax whose batch_stats held `step`/`decay_product` for every layer."""
  import jax.numpy as jnp

  checkpoints = rundir.Checkpoints(tmp_path / 'checkpoints')
  checkpoints.save(1, {'mean': jnp.zeros(3), 'step': jnp.zeros((), jnp.int32)}, [[{'epoch': 1}]])
  checkpoints.close()
  with pytest.raises(rundir.RunDirError, match='holds a state of another layout .*--overwrite') as refused:
    rundir.Checkpoints(tmp_path / 'checkpoints').restore({'mean': jnp.zeros(3)}, log=lambda m: None)
  assert '\n' not in str(refused.value)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['1']  # not set aside as damaged
