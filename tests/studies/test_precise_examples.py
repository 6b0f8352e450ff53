"""The precise_examples study: the accuracy curve over whole batches of examples, on both models."""

from tiny_study import run_tiny


def test_precise_examples_curve(tmp_path, study_data_dir):
  results, out = run_tiny('precise_examples', tmp_path, study_data_dir, mlp_epochs=1, cnn_epochs=1,
                          examples=[100, 1000, 10_000])
  curves = results['results']['curves']
  # Whole batches: 100 examples are one batch of 500; 1000 two; 10^4 more than the 5000 there are.
  assert list(curves['MNIST MLP, batch 500']) == ['500', '1000', '5000']
  assert list(curves['CIFAR-10 CNN, batch 32']) == ['96']  # 3 batches of 32 out of 98 training examples
  assert (out / 'precise_examples.png').exists()
