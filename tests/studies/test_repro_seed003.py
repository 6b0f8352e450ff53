"""The repro_seed003 study: the CNN beside the source's log; its run continued, a shorter re-run refused."""

import pytest

from bnjax.lab import rundir, studies
from tiny_study import run_tiny


def test_compares_with_the_source_log_and_resumes(tmp_path, study_data_dir):
  results, out = run_tiny('repro_seed003', tmp_path, study_data_dir, epochs=1)
  assert [m['epoch'] for m in results['results']['history']] == [1]
  assert '0.5887' in results['table'] and '(not run)' in results['table']
  results, _ = run_tiny('repro_seed003', tmp_path, study_data_dir, epochs=2)  # continues from epoch 1's checkpoint
  assert [m['epoch'] for m in results['results']['history']] == [1, 2]
  assert (out / 'seed003_curves.png').exists()
  # Re-run shorter: refused in one line naming the run's folder (study.py has no --workdir), not a 2-epoch table.
  with pytest.raises(rundir.RunDirError, match=r'^\S+/repro_seed003/run holds a run of --epochs=2; this command asks '
                     '--epochs=1, shorter: pass --overwrite') as refused:
    run_tiny('repro_seed003', tmp_path, study_data_dir, epochs=1)
  assert '--workdir' not in str(refused.value) and '\n' not in str(refused.value)
  results = studies.run_study('repro_seed003', tmp_path, overrides=dict(epochs=1), data_dir=study_data_dir,
                              log=lambda message: None, overwrite=True)
  assert [m['epoch'] for m in results['results']['history']] == [1]
