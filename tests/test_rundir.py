"""bnjax.lab.rundir: a folder holds one run; resume continues only that run; outputs per epoch."""

import json

import pytest

from bnjax.lab import config as C
from bnjax.lab import experiment, rundir
from conftest import run_script


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
  with pytest.raises(rundir.RunDirError, match=r"--batch_size=100 \(now 50\)"):
    experiment.run(_config(data_dir, tmp_path, batch_size=50), resume=True, progress=False)
  with pytest.raises(rundir.RunDirError, match='--norm'):
    experiment.run(_config(data_dir, tmp_path, norm='renorm'), resume=True, progress=False)
  # Settings that don't change results, and a longer run at a constant learning rate, may change.
  experiment.run(_config(data_dir, tmp_path, epochs=2, progress_updates=3), resume=True, progress=False,
                 log=lambda m: None)
  with pytest.raises(rundir.RunDirError, match='--epochs'):
    experiment.run(_config(data_dir, tmp_path, epochs=3, lr_schedule='cosine'), resume=True, progress=False)


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
  assert mismatch.returncode == 2 and '--seed=0 (now 1)' in mismatch.stderr
