"""bnjax.lab.resnet: ResNet-20/32/56 of He et al. 2016 for CIFAR-10."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.lab import resnet


def _param_count(depth):
  variables = jax.eval_shape(resnet.ResNet(depth=depth).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return sum(leaf.size for leaf in jax.tree.leaves(variables['params']))


@pytest.mark.parametrize('depth, paper_millions, exact', [(20, 0.27, 269_722), (32, 0.46, 464_154), (56, 0.85, 853_018)])
def test_parameter_count_is_the_papers(depth, paper_millions, exact):
  # He et al. 2016, Table 6: 0.27M, 0.46M, 0.85M; the exact counts of the usual PyTorch reproduction
  # (option A, no conv bias, BN scale and bias, Dense 64 -> 10).
  count = _param_count(depth)
  assert count == exact
  assert round(count / 1e6, 2) == paper_millions


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
  x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
  y = np.asarray(resnet.option_a_shortcut(jnp.asarray(x), 7, 2))
  assert y.shape == (2, 2, 2, 7)
  np.testing.assert_array_equal(y[..., 2:5], x[:, ::2, ::2, :])
  np.testing.assert_array_equal(y[..., :2], 0)
  np.testing.assert_array_equal(y[..., 5:], 0)
  np.testing.assert_array_equal(resnet.option_a_shortcut(jnp.asarray(x), 3, 1), x)


def test_conv_kernels_are_he_normal_fan_out():
  variables = jax.jit(resnet.ResNet(depth=8).init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  kernel = variables['params']['stage2_block0']['conv_1']['kernel']  # [3, 3, 64, 64]
  np.testing.assert_allclose(np.std(kernel), np.sqrt(2.0 / (9 * 64)), rtol=0.05)
  assert 'bias' not in variables['params']['stage2_block0']['conv_1']


def test_a_depth_that_is_not_6n_plus_2_names_the_papers_depths():
  with pytest.raises(ValueError, match='6n \\+ 2.*20, 32'):
    resnet.ResNet(depth=21).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_training_step_equals_flax_layers():
  # The default (bnjax BatchNorm, conv.Conv's CPU path) against flax's own Conv and BatchNorm with the same
  # momentum and epsilon: the same logits, gradients and moving statistics.
  x = jax.random.normal(jax.random.key(1), (16, 8, 8, 3))
  labels = jnp.arange(16) % 10
  ours = resnet.ResNet(depth=8)
  flax_norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
  reference = resnet.ResNet(depth=8, norm=flax_norm, conv=nn.Conv)
  variables = ours.init(jax.random.key(0), x)
  ref_stats = jax.tree.map(lambda s: {'mean': s['mean'], 'var': s['var']}, variables['batch_stats'],
                           is_leaf=lambda s: isinstance(s, dict) and 'mean' in s)

  def loss(params, model, stats):
    logits, updates = model.apply({'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(16), labels]), (logits, updates['batch_stats'])

  (_, (logits, stats)), grads = jax.value_and_grad(loss, has_aux=True)(variables['params'], ours, variables['batch_stats'])
  (_, (ref_logits, ref_new)), ref_grads = jax.value_and_grad(loss, has_aux=True)(variables['params'], reference, ref_stats)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, ref_grads)
  np.testing.assert_allclose(stats['stage1_block0']['norm_1']['var'], ref_new['stage1_block0']['norm_1']['var'], rtol=1e-5)
  eval_logits = ours.apply({'params': variables['params'], 'batch_stats': stats}, x)
  ref_eval = reference.apply({'params': variables['params'], 'batch_stats': ref_new}, x)
  np.testing.assert_allclose(eval_logits, ref_eval, rtol=1e-4, atol=1e-5)
