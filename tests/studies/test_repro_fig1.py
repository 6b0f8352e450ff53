"""The repro_fig1 study: test accuracy and a sigmoid's input percentiles tracked from step 0, reused when re-run."""

import numpy as np

from bnjax.lab import studies
from tiny_study import run_tiny


def test_tracks_accuracy_and_percentiles_from_step_zero(tmp_path, study_data_dir):
  results, out = run_tiny('repro_fig1', tmp_path, study_data_dir, steps=60, every=20)
  for norm in ('none', 'bn'):
    track = results['results']['tracks'][norm]
    assert track['step'] == [0, 20, 40, 60]
    for key in ('percentiles', 'percentiles_batch_stats'):
      p = np.asarray(track[key])
      assert p.shape == (4, 3) and np.all(p[:, 0] <= p[:, 1]) and np.all(p[:, 1] <= p[:, 2])
  # Without norm layers, inference and batch statistics are the same computation.
  none = results['results']['tracks']['none']
  np.testing.assert_allclose(none['percentiles'], none['percentiles_batch_stats'], rtol=1e-5, atol=1e-6)
  assert (out / 'fig1.png').exists()
  # Re-running reuses the tracks already measured with the same config.
  stamp = (out / 'track_bn.json').stat().st_mtime_ns
  studies.run_study('repro_fig1', tmp_path, overrides=dict(steps=60, every=20), data_dir=study_data_dir,
                    log=lambda message: None)
  assert (out / 'track_bn.json').stat().st_mtime_ns == stamp
