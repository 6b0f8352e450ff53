"""The repro_dropout study: the variance shift of dropout before BN, at initialization and trained, on both models."""

import pytest

from tiny_study import run_tiny


def test_measures_the_variance_shift_on_both_models(tmp_path, study_data_dir):
  results, out = run_tiny('repro_dropout', tmp_path, study_data_dir, mlp_epochs=1, seeds=[0], rates=[0.5],
                          cnn_epochs=1, placements=['before_norm', 'end'])
  mlp = results['results']['mnist_mlp (MNIST)']
  find = lambda runs, norm, placement: next(r for r in runs if r['config']['norm'] == norm
                                            and r['config']['dropout_placement'] == placement)
  assert find(mlp, 'none', 'end')['variance_shift'] == pytest.approx(1.0, abs=1e-5)
  assert find(mlp, 'none', 'before_norm')['variance_shift'] > 1.2
  assert len(find(mlp, 'bn', 'before_norm')['variance_shift_blocks']) == 6
  # At initialization the shift of dropout before BN compounds with depth (Li et al. 2019).
  at_init = find(mlp, 'bn', 'before_norm')['variance_shift_at_init_blocks']
  assert at_init[0] > 1.5 and at_init[-1] > 4 * at_init[0]
  assert find(mlp, 'bn', 'end')['variance_shift_at_init'] == pytest.approx(1.0, abs=1e-3)
  cnn = results['results']['cifar_cnn (CIFAR-10)']
  assert {r['config']['dropout_placement'] for r in cnn} == {'before_norm', 'end'}
  assert len(find(cnn, 'bn', 'before_norm')['moving_variance_ratio_blocks']) == 7
  assert find(cnn, 'bn', 'before_norm')['variance_shift_blocks'][0] > 1.2  # its own dropout, block 0
  assert (out / 'dropout.png').exists()
