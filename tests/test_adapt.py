"""Test-time adaptation (bnjax.adapt) against direct computations: the prior's limits, AdaBN as the
target set's statistics, TENT's first step as a hand-computed gradient step; the NNX versions."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnjax import adapt
from bnjax import linen as bn_linen

EPS = 1e-3


class Mlp(nn.Module):
  norm: type = bn_linen.BatchNorm

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Dense(8, name='dense')(x)
    h = self.norm(epsilon=EPS, name='norm')(h, use_running_average=not train)
    return nn.Dense(3, name='head')(nn.relu(h))


MODEL = Mlp()
TRAIN_APPLY = functools.partial(MODEL.apply, train=True)
X = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 5)) * 2.0 + 1.0  # 4 test batches of 16


def _variables():
  variables = MODEL.init(jax.random.PRNGKey(0), X[0])
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(2), p.shape), variables['params'])
  stats = {'norm': {'mean': jnp.linspace(-1, 1, 8), 'var': jnp.linspace(0.5, 2, 8)}}  # "source" statistics
  return {'params': params, 'batch_stats': stats}


VARIABLES = _variables()


def test_prior_is_prediction_bn_at_zero_and_the_source_at_infinity():
  x = X[0]
  np.testing.assert_allclose(adapt.prior_bn(TRAIN_APPLY, VARIABLES, x, 0.0),
                             adapt.prediction_bn(TRAIN_APPLY, VARIABLES, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(adapt.prior_bn(TRAIN_APPLY, VARIABLES, x, float('inf')), MODEL.apply(VARIABLES, x),
                             rtol=1e-5, atol=1e-5)
  # In between: the normalization uses w * source + (1 - w) * batch, w = N / (N + n).
  h = x @ VARIABLES['params']['dense']['kernel'] + VARIABLES['params']['dense']['bias']
  w = 16 / (16 + 16)
  mean = w * VARIABLES['batch_stats']['norm']['mean'] + (1 - w) * h.mean(0)
  var = w * VARIABLES['batch_stats']['norm']['var'] + (1 - w) * h.var(0)
  p = VARIABLES['params']
  y = (h - mean) / jnp.sqrt(var + EPS) * p['norm']['scale'] + p['norm']['bias']
  want = nn.relu(y) @ p['head']['kernel'] + p['head']['bias']
  np.testing.assert_allclose(adapt.prior_bn(TRAIN_APPLY, VARIABLES, x, 16.0), want, rtol=1e-4, atol=1e-4)


def test_adabn_is_the_statistics_of_the_target_set():
  stats = adapt.adabn(TRAIN_APPLY, VARIABLES, X)
  h = np.asarray(X.reshape(-1, 5) @ VARIABLES['params']['dense']['kernel'] + VARIABLES['params']['dense']['bias'])
  np.testing.assert_allclose(stats['norm']['mean'], h.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats['norm']['var'], h.var(0), rtol=1e-5, atol=1e-5)


def _hand_forward(scale, bias, x):
  p = VARIABLES['params']
  h = x @ p['dense']['kernel'] + p['dense']['bias']
  y = (h - h.mean(0)) / jnp.sqrt(h.var(0) + EPS) * scale + bias
  return nn.relu(y) @ p['head']['kernel'] + p['head']['bias']


def _hand_entropy(scale, bias, x):
  probs = jax.nn.softmax(_hand_forward(scale, bias, x))
  return -jnp.mean(jnp.sum(probs * jnp.log(probs), -1))


def test_tent_first_step_is_a_gradient_step_on_scale_and_bias_only():
  lr = 0.5
  logits, state = adapt.tent(TRAIN_APPLY, VARIABLES, X[:1], optax.sgd(lr))
  p = VARIABLES['params']['norm']
  g_scale, g_bias = jax.grad(_hand_entropy, argnums=(0, 1))(p['scale'], p['bias'], X[0])
  np.testing.assert_allclose(logits[0], _hand_forward(p['scale'], p['bias'], X[0]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state.norm_params[('norm', 'scale')], p['scale'] - lr * g_scale, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.norm_params[('norm', 'bias')], p['bias'] - lr * g_bias, rtol=1e-5, atol=1e-6)
  assert set(state.norm_params) == {('norm', 'scale'), ('norm', 'bias')}
  adapted = adapt.tent_variables(VARIABLES, state)
  np.testing.assert_array_equal(adapted['params']['dense']['kernel'], VARIABLES['params']['dense']['kernel'])


def test_tent_episodic_predicts_as_prediction_bn_and_continual_adapts():
  episodic, _ = adapt.tent(TRAIN_APPLY, VARIABLES, X, optax.adam(1e-2), episodic=True)
  continual, _ = adapt.tent(TRAIN_APPLY, VARIABLES, X, optax.adam(1e-2))
  for s in range(X.shape[0]):
    np.testing.assert_allclose(episodic[s], adapt.prediction_bn(TRAIN_APPLY, VARIABLES, X[s]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(continual[0], episodic[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(continual[-1], episodic[-1], atol=1e-4)
  assert adapt.mean_entropy(continual[-1]) < adapt.mean_entropy(episodic[-1])


def test_nnx_versions_match_the_hand_computation():
  from flax import nnx

  from bnjax import nnx as bn_nnx

  class NnxMlp(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(5, 8, rngs=rngs)
      self.norm = bn_nnx.BatchNorm(8, epsilon=EPS, rngs=rngs)
      self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.head(nnx.relu(self.norm(self.dense(x))))

  model = NnxMlp(nnx.Rngs(0))
  p = VARIABLES['params']
  model.dense.kernel[...], model.dense.bias[...] = p['dense']['kernel'], p['dense']['bias']
  model.head.kernel[...], model.head.bias[...] = p['head']['kernel'], p['head']['bias']
  model.norm.scale[...], model.norm.bias[...] = p['norm']['scale'], p['norm']['bias']
  model.eval()
  np.testing.assert_allclose(adapt.nnx_prediction_bn(model, X[0]), _hand_forward(p['norm']['scale'],
                                                                                 p['norm']['bias'], X[0]),
                             rtol=1e-5, atol=1e-5)
  lr = 0.5
  logits = adapt.nnx_tent(model, X[:1], optax.sgd(lr))
  g_scale, g_bias = jax.grad(_hand_entropy, argnums=(0, 1))(p['norm']['scale'], p['norm']['bias'], X[0])
  np.testing.assert_allclose(logits[0], _hand_forward(p['norm']['scale'], p['norm']['bias'], X[0]), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(model.norm.scale[...], p['norm']['scale'] - lr * g_scale, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.norm.bias[...], p['norm']['bias'] - lr * g_bias, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(model.dense.kernel[...], p['dense']['kernel'])
  adapt.nnx_adabn(model, X)
  h = np.asarray(X.reshape(-1, 5) @ p['dense']['kernel'] + p['dense']['bias'])
  np.testing.assert_allclose(model.norm.mean[...], h.mean(0), rtol=1e-5, atol=1e-5)


def test_tent_without_norm_layers_says_so():
  plain = nn.Dense(3)
  variables = plain.init(jax.random.PRNGKey(0), X[0])
  with pytest.raises(ValueError, match='no norm layer'):
    adapt.tent(lambda v, x, mutable: (plain.apply(v, x), {}), variables, X, optax.sgd(0.1))


def test_renorm_layers_adapt_with_batch_statistics_alone():
  model = Mlp(norm=bn_linen.BatchRenorm)
  train_apply = functools.partial(model.apply, train=True)
  stats = {'mean': jnp.linspace(-1, 1, 8), 'std': jnp.linspace(0.5, 2, 8)}
  variables = {'params': VARIABLES['params'], 'batch_stats': {'norm': {**stats, 'renorm_mean': stats['mean'],
                                                                       'renorm_std': stats['std']}}}
  p = VARIABLES['params']['norm']
  want = _hand_forward(p['scale'], p['bias'], X[0])  # batch statistics, r = 1, d = 0
  np.testing.assert_allclose(adapt.prediction_bn(train_apply, variables, X[0]), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(adapt.prior_bn(train_apply, variables, X[0], 0.0), want, rtol=1e-5, atol=1e-5)
  logits, _ = adapt.tent(train_apply, variables, X[:1], optax.sgd(0.1))
  np.testing.assert_allclose(logits[0], want, rtol=1e-5, atol=1e-5)
  adapted = adapt.adabn(train_apply, variables, X)
  h = np.asarray(X.reshape(-1, 5) @ VARIABLES['params']['dense']['kernel'] + VARIABLES['params']['dense']['bias'])
  np.testing.assert_allclose(adapted['norm']['mean'], h.mean(0), rtol=1e-5, atol=1e-5)


def _nnx_two_norm_model(norm_class):
  """dense -> norm -> relu -> dense -> norm -> relu -> head (NNX), its weights from one seed; for renorm, source
  statistics far from the data (so that renorm's r and d in training mode would map back to them)."""
  from flax import nnx

  class TwoNorm(nnx.Module):
    def __init__(self, rngs):
      self.dense1, self.norm1 = nnx.Linear(5, 8, rngs=rngs), norm_class(8, epsilon=EPS, rngs=rngs)
      self.dense2, self.norm2 = nnx.Linear(8, 8, rngs=rngs), norm_class(8, epsilon=EPS, rngs=rngs)
      self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      h = nnx.relu(self.norm1(self.dense1(x)))
      return self.head(nnx.relu(self.norm2(self.dense2(h))))

  model = TwoNorm(nnx.Rngs(0))
  for layer in (model.norm1, model.norm2):
    for field in ('mean', 'renorm_mean'):
      if hasattr(layer, field):
        getattr(layer, field)[...] = jnp.linspace(-3, 3, 8)
    for field in ('std', 'renorm_std'):
      if hasattr(layer, field):
        getattr(layer, field)[...] = jnp.linspace(0.2, 4, 8)
  model.eval()
  return model


def test_nnx_renorm_layers_adapt_with_batch_statistics_alone():
  from bnjax import nnx as bn_nnx

  renorm, bn = _nnx_two_norm_model(bn_nnx.BatchRenorm), _nnx_two_norm_model(bn_nnx.BatchNorm)
  np.testing.assert_allclose(adapt.nnx_prediction_bn(renorm, X[0]), adapt.nnx_prediction_bn(bn, X[0]), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(adapt.nnx_tent(renorm, X[:2], optax.sgd(0.5)), adapt.nnx_tent(bn, X[:2], optax.sgd(0.5)),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(renorm.norm2.scale[...], bn.norm2.scale[...], rtol=1e-4, atol=1e-6)
  adapt.nnx_adabn(renorm, X)
  adapt.nnx_adabn(bn, X)
  for r, b in ((renorm.norm1, bn.norm1), (renorm.norm2, bn.norm2)):  # the second layer sees batch-normalized inputs
    np.testing.assert_allclose(r.mean[...], b.mean[...], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r.std[...], jnp.sqrt(b.var[...] + EPS), rtol=1e-5, atol=1e-5)
