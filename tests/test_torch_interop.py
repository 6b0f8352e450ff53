"""bnjax against torch.nn.BatchNorm1d/2d: the settings of bnjax.torch_interop's table, and its state dicts."""

import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import torch_interop

torch = pytest.importorskip('torch')


def _nhwc(t):
  return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def _torch_bn(module_type, channels, **kwargs):
  torch.manual_seed(0)
  bn = module_type(channels, **kwargs)
  if bn.affine:
    with torch.no_grad():
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.uniform_(-0.5, 0.5)
  return bn


@pytest.mark.parametrize('case', ['conv_momentum', 'dense_cumulative'])
def test_training_and_evaluation_equal_torch_step_for_step(case):
  if case == 'conv_momentum':
    bn, shape, momentum = _torch_bn(torch.nn.BatchNorm2d, 3, momentum=0.1), (4, 3, 8, 8), 0.1
    to_ours = _nhwc
  else:
    bn, shape, momentum = _torch_bn(torch.nn.BatchNorm1d, 5, momentum=None), (8, 5), None
    to_ours = lambda t: jnp.asarray(t.detach().numpy())
  params, state = torch_interop.from_torch_state_dict(bn.state_dict())
  options = dict(momentum=bnjax.momentum_from_pytorch(momentum), epsilon=bn.eps, unbiased_moving_var=True)
  generator = torch.Generator().manual_seed(1)
  worst = 0.0
  for step in range(4):
    x = torch.randn(shape, generator=generator) * (1.0 + step) + step
    y_torch = bn.train()(x)
    y, state = bnjax.batch_norm(to_ours(x), params, state, training=True, **options)
    worst = max(worst, float(np.max(np.abs(np.asarray(y) - np.asarray(to_ours(y_torch))))))
  assert worst < 1e-5
  _, theirs = torch_interop.from_torch_state_dict(bn.state_dict())
  np.testing.assert_allclose(state.mean, theirs.mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.var, theirs.var, rtol=1e-5)
  assert int(state.step) == int(theirs.step) == 4
  x = torch.randn(shape, generator=generator) + 2.0
  y, _ = bnjax.batch_norm(to_ours(x), params, state, training=False, epsilon=bn.eps)
  np.testing.assert_allclose(y, to_ours(bn.eval()(x)), rtol=1e-5, atol=1e-5)


def test_the_biased_moving_variance_is_n_over_n_minus_1_smaller():
  bn = _torch_bn(torch.nn.BatchNorm1d, 5, momentum=1.0)  # running_var = the last batch's unbiased variance
  x = torch.randn(8, 5, generator=torch.Generator().manual_seed(2))
  bn.train()(x)
  params, state = bnjax.batch_norm_init(5)
  _, state = bnjax.batch_norm(jnp.asarray(x.numpy()), params, state, training=True, momentum=0.0)
  np.testing.assert_allclose(state.var * 8 / 7, bn.running_var.numpy(), rtol=1e-5)


def test_state_dict_round_trip_and_a_prefix():
  bn = _torch_bn(torch.nn.BatchNorm2d, 3)
  bn.train()(torch.randn(4, 3, 5, 5) + 1.0)
  model_dict = {f'layer1.bn.{k}': v for k, v in bn.state_dict().items()} | {'layer1.conv.weight': torch.zeros(1)}
  params, state = torch_interop.from_torch_state_dict(model_dict, prefix='layer1.bn.')
  assert set(params) == {'scale', 'bias'} and int(state.step) == 1
  fresh = torch.nn.BatchNorm2d(3)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in torch_interop.to_torch_state_dict(params, state).items()})
  x = torch.randn(2, 3, 5, 5)
  np.testing.assert_allclose(fresh.eval()(x).detach().numpy(), bn.eval()(x).detach().numpy(), rtol=1e-6, atol=1e-6)
  # A linen layer's batch_stats (mean and var only) write num_batches_tracked 0.
  linen_dict = torch_interop.to_torch_state_dict(params, {'mean': state.mean, 'var': state.var})
  assert linen_dict['num_batches_tracked'] == 0 and linen_dict['num_batches_tracked'].dtype == np.int64
  with pytest.raises(ValueError, match='running_mean'):
    torch_interop.from_torch_state_dict(torch.nn.BatchNorm1d(3, track_running_stats=False).state_dict())


def test_track_running_stats_false_is_batch_statistics_in_evaluation_too():
  bn = _torch_bn(torch.nn.BatchNorm1d, 5, track_running_stats=False)
  x = torch.randn(8, 5) * 2.0 + 1.0
  params = {'scale': jnp.asarray(bn.weight.detach().numpy()), 'bias': jnp.asarray(bn.bias.detach().numpy())}
  y, _ = bnjax.batch_norm(jnp.asarray(x.numpy()), params, bnjax.batch_norm_init(5)[1], training=True,
                          epsilon=bn.eps)
  np.testing.assert_allclose(y, bn.eval()(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_linen_and_nnx_layers_with_unbiased_moving_var_equal_torch():
  import jax
  from flax import nnx

  from bnjax import linen as bnlinen
  from bnjax import nnx as bnnnx

  bn = _torch_bn(torch.nn.BatchNorm2d, 3)
  params, state = torch_interop.from_torch_state_dict(bn.state_dict())
  options = dict(momentum=0.9, unbiased_moving_var=True)  # epsilon: flax's default is torch's, 1e-5
  module = bnlinen.BatchNorm(**options)
  variables = {'params': params, 'batch_stats': {'mean': state.mean, 'var': state.var}}
  layer = bnnnx.BatchNorm(3, rngs=nnx.Rngs(0), **options)
  nnx.update(layer, nnx.State({'scale': nnx.Param(params['scale']), 'bias': nnx.Param(params['bias'])}))
  for step in range(2):
    x = torch.randn(4, 3, 6, 6) + step
    y_torch = _nhwc(bn.train()(x))
    y, updates = module.apply(variables, _nhwc(x), use_running_average=False, mutable=['batch_stats'])
    variables = {**variables, **updates}
    np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer(_nhwc(x)), y_torch, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               variables['batch_stats'], {'mean': bn.running_mean.numpy(), 'var': bn.running_var.numpy()})
  np.testing.assert_allclose(layer.var[...], bn.running_var.numpy(), rtol=1e-5)
