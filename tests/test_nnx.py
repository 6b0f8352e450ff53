"""Tests for bnjax.nnx: equal to flax.nnx.BatchNorm and to bnjax.linen's layers; NNX's transforms; precise BN, freeze."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
from bnjax import linen as bnlinen
from bnjax import nnx as bnnnx

C = 5


def _x(seed=0, shape=(8, C)):
  return 3.0 * jax.random.normal(jax.random.key(seed), shape) + 1.5


def _max_difference(a, b):
  return max(float(jnp.max(jnp.abs(jnp.asarray(u, jnp.float32) - jnp.asarray(v, jnp.float32))))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class _MLP(nnx.Module):
  def __init__(self, norm, rngs):
    self.linear = nnx.Linear(4, 6, rngs=rngs)
    self.norm = norm(6, momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.norm(self.linear(x))))


def test_accepts_every_argument_of_nnx_batchnorm_with_its_defaults():
  theirs = inspect.signature(nnx.BatchNorm.__init__).parameters
  ours = inspect.signature(bnnnx.BatchNorm.__init__).parameters
  for name, parameter in theirs.items():
    assert name in ours, name
    if name not in ('bias_init', 'scale_init'):  # fresh initializer closures: compared by their values below
      assert ours[name].default == parameter.default, name
  layers = [cls(C, rngs=nnx.Rngs(0), scale_init=nnx.initializers.constant(2.0), use_bias=False)
            for cls in (nnx.BatchNorm, bnnnx.BatchNorm)]
  assert jax.tree.map(jnp.shape, nnx.state(layers[0])) == jax.tree.map(jnp.shape, nnx.state(layers[1]))
  assert _max_difference(nnx.state(layers[0]), nnx.state(layers[1])) == 0.0


def test_trains_as_nnx_batchnorm_step_for_step_under_jit():
  models = [_MLP(norm, nnx.Rngs(0)) for norm in (nnx.BatchNorm, bnnnx.BatchNorm)]
  assert _max_difference(nnx.state(models[0]), nnx.state(models[1])) == 0.0

  @nnx.jit
  def train_step(model, x, y):
    def loss_fn(model):
      logits = model(x)
      return jnp.mean((logits - y) ** 2), logits

    grads, logits = nnx.grad(loss_fn, has_aux=True)(model)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
    return logits, grads

  rng = np.random.default_rng(0)
  for step in range(4):
    x = jnp.asarray(rng.normal(step, 2.0, (16, 4)), jnp.float32)
    y = jnp.asarray(rng.normal(0.0, 1.0, (16, 3)), jnp.float32)
    (logits_t, grads_t), (logits_o, grads_o) = (train_step(model, x, y) for model in models)
    assert _max_difference(logits_o, logits_t) < 1e-5
    assert _max_difference(grads_o, grads_t) < 1e-5
  assert _max_difference(nnx.state(models[1]), nnx.state(models[0])) < 1e-5
  for model in models:
    model.eval()
  x = jnp.asarray(rng.normal(1.0, 2.0, (5, 4)), jnp.float32)
  assert _max_difference(models[1](x), models[0](x)) < 1e-5


# kind -> (nnx class, linen class, options)
KINDS = {
    'ghost': (bnnnx.BatchNorm, bnlinen.BatchNorm, dict(momentum=0.8, virtual_batch_size=4, debias=True)),
    'renorm': (bnnnx.BatchRenorm, bnlinen.BatchRenorm, dict(momentum=0.9, renorm_momentum=0.7, rmax=1.5, dmax=0.5)),
    'renorm_schedule': (bnnnx.BatchRenorm, bnlinen.BatchRenorm,
                        dict(momentum=None, rmax=lambda step: 1.0 + 0.5 * step, dmax=0.5, virtual_batch_size=2)),
}


@pytest.mark.parametrize('kind', list(KINDS))
def test_equals_bnjax_linen(kind):
  nnx_type, linen_type, options = KINDS[kind]
  layer = nnx_type(C, rngs=nnx.Rngs(0), **options)
  module = linen_type(**options)
  variables = module.init(jax.random.key(0), _x(), use_running_average=False)
  assert set(variables['batch_stats']) == set(nnx.state(layer, nnx.BatchStat))
  mask = jnp.arange(8) < 6
  for step in range(3):
    x = _x(step) + step
    y, updates = module.apply(variables, x, use_running_average=False, mask=mask, mutable=['batch_stats'])
    variables = {**variables, **updates}
    assert _max_difference(layer(x, mask=mask), y) < 1e-6
  stats = {name: value[...] for name, value in nnx.state(layer, nnx.BatchStat).items()}
  assert _max_difference(stats, variables['batch_stats']) < 1e-6
  layer.eval()
  assert _max_difference(layer(_x(9)), module.apply(variables, _x(9), use_running_average=True)) < 1e-6


def test_train_eval_view_and_call_argument():
  layer = bnnnx.BatchNorm(C, rngs=nnx.Rngs(0))
  x = _x()
  layer(x)  # training by default, as nnx.BatchNorm
  stats = nnx.clone(nnx.state(layer, nnx.BatchStat))
  evaluation = nnx.view(layer, use_running_average=True)
  y_view = evaluation(x)
  assert _max_difference(nnx.state(layer, nnx.BatchStat), stats) == 0.0
  layer.eval()
  np.testing.assert_array_equal(layer(x), y_view)
  layer.train()
  assert not layer.use_running_average
  np.testing.assert_array_equal(layer(x, use_running_average=True), y_view)
  with pytest.raises(ValueError, match='use_running_average'):
    bnnnx.BatchNorm(C, use_running_average=None, rngs=nnx.Rngs(0))(x)


def test_vmap_ensemble_and_vmapped_momentum():
  momentums = jnp.array([0.5, 0.9, 0.99])

  @nnx.vmap(in_axes=(0, 0))
  def create(momentum, key):
    return bnnnx.BatchNorm(C, momentum=momentum, rngs=nnx.Rngs(params=key))

  ensemble = create(momentums, jax.random.split(jax.random.key(0), 3))
  x = jnp.stack([_x(k) for k in range(3)])

  @nnx.vmap(in_axes=(0, 0))
  def forward(model, x):
    return model(x)

  for step in range(2):
    ys = forward(ensemble, x + step)
  for k, momentum in enumerate(momentums.tolist()):
    member = bnnnx.BatchNorm(C, momentum=momentum, rngs=nnx.Rngs(0))
    for step in range(2):
      y = member(x[k] + step)
    np.testing.assert_allclose(ys[k], y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ensemble.var[...][k], member.var[...], rtol=1e-5)


def test_scan_over_batches_equals_a_loop():
  layer = bnnnx.BatchRenorm(C, momentum=0.8, rmax=1.5, dmax=0.5, rngs=nnx.Rngs(0))
  reference = nnx.clone(layer)
  batches = jnp.stack([_x(k) + k for k in range(4)])

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def run(layer, x):
    return layer, layer(x)

  _, ys = run(layer, batches)
  for k in range(4):
    np.testing.assert_allclose(ys[k], reference(batches[k]), rtol=1e-5, atol=1e-5)
  assert _max_difference(nnx.state(layer), nnx.state(reference)) < 1e-6


def test_split_merge_and_eval_shape():
  layer = bnnnx.BatchNorm(C, momentum=lambda step: 0.5, debias=True, rngs=nnx.Rngs(0))
  layer(_x())
  graphdef, state = nnx.split(layer)
  assert set(nnx.state(layer, nnx.BatchStat)) == {'mean', 'var', 'step', 'decay_product'}
  copy = nnx.merge(graphdef, state)
  np.testing.assert_array_equal(copy(_x(1)), layer(_x(1)))
  abstract = nnx.eval_shape(lambda: bnnnx.BatchRenorm(C, rngs=nnx.Rngs(0)))
  assert jax.tree.map(lambda a: a.shape, nnx.state(abstract, nnx.BatchStat)) == {
      name: (C,) for name in ('mean', 'std', 'renorm_mean', 'renorm_std')}


def test_bridge_both_ways():
  x = _x()
  # A bnjax.linen layer inside an NNX model.
  wrapped = nnx.bridge.ToNNX(bnlinen.BatchNorm(momentum=0.9, use_running_average=False), rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(wrapped, x)
  native = bnnnx.BatchNorm(C, momentum=0.9, rngs=nnx.Rngs(0))
  for step in range(2):
    np.testing.assert_allclose(wrapped(x + step, mutable=['batch_stats']), native(x + step), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(wrapped.mean[...], native.mean[...], rtol=1e-6)
  # A bnjax.nnx layer inside a linen model.
  module = nnx.bridge.ToLinen(bnnnx.BatchNorm, args=(C,), kwargs={'momentum': 0.9})
  variables = module.init(jax.random.key(0), x)
  y, updates = module.apply(variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y, bnlinen.BatchNorm(use_running_average=False).apply(
      {'params': variables['params'], 'batch_stats': variables['batch_stats']}, x, mutable=['batch_stats'])[0],
      rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * x.mean(0), rtol=1e-5)


class _Net(nnx.Module):
  """Linear -> BN -> relu -> Linear -> renorm."""

  def __init__(self, rngs):
    self.linear1 = nnx.Linear(4, 6, rngs=rngs)
    self.norm1 = bnnnx.BatchNorm(6, rngs=rngs)
    self.linear2 = nnx.Linear(6, 3, rngs=rngs)
    self.norm2 = bnnnx.BatchRenorm(3, epsilon=1e-2, rngs=rngs)

  def __call__(self, x):
    return self.norm2(self.linear2(nnx.relu(self.norm1(self.linear1(x)))))


def test_precise_statistics_are_the_population_statistics_of_each_layer_input():
  model = _Net(nnx.Rngs(0))
  model.norm2.renorm_std[...] = jnp.full((3,), 3.0)  # r and d matter in training mode
  images = np.random.default_rng(1).normal(2.0, 1.5, (5, 8, 4)).astype(np.float32)
  images += np.arange(5, dtype=np.float32)[:, None, None]
  # The inputs of both layers by hand, from each batch's training-mode pass (float64).
  w1, b1, w2, b2 = (np.asarray(a[...], np.float64) for a in (model.linear1.kernel, model.linear1.bias,
                                                               model.linear2.kernel, model.linear2.bias))
  h1 = images.astype(np.float64) @ w1 + b1
  normalized = (h1 - h1.mean(1, keepdims=True)) / np.sqrt(h1.var(1, keepdims=True) + 1e-5)
  h2 = np.maximum(normalized, 0) @ w2 + b2
  model.eval()
  bnjax.nnx.precise_statistics(model, images, num_examples=None)
  np.testing.assert_allclose(model.norm1.mean[...], h1.reshape(-1, 6).mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.norm1.var[...], h1.reshape(-1, 6).var(0), rtol=1e-5)
  np.testing.assert_allclose(model.norm2.mean[...], h2.reshape(-1, 3).mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.norm2.std[...], np.sqrt(h2.reshape(-1, 3).var(0) + 1e-2), rtol=1e-5)
  assert model.norm1.use_running_average  # the model is left as it was
  with pytest.raises(ValueError, match='no bnjax.nnx'):
    bnjax.nnx.precise_statistics(_MLP(nnx.BatchNorm, nnx.Rngs(0)), images)


def test_freeze_keeps_the_statistics_through_train():
  model = _Net(nnx.Rngs(0))
  x = _x(shape=(8, 4))
  model(x)
  bnjax.nnx.freeze(model)
  model.train()
  stats = nnx.clone(nnx.state(model, nnx.BatchStat))
  y = model(x)
  assert _max_difference(nnx.state(model, nnx.BatchStat), stats) == 0.0
  np.testing.assert_array_equal(y, nnx.view(model, use_running_average=True)(x))
  bnjax.nnx.freeze(model, False)
  model(x)
  assert _max_difference(nnx.state(model, nnx.BatchStat), stats) > 0.0


def test_the_nnx_mnist_example_runs(data_dir):
  import os
  import subprocess
  import sys

  from conftest import REPO

  command = [sys.executable, str(REPO / 'experiments' / 'nnx_mnist.py'), f'--data_dir={data_dir}', '--data_source=files',
             '--steps=10', '--batch_size=50']
  result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert lines[0].startswith('without BN: test accuracy 0.') and lines[1].startswith('with BN: test accuracy 0.')
  assert 'with precise statistics 0.' in lines[1]


def test_axis_name_weights_devices_by_their_valid_examples():
  layer = bnnnx.BatchNorm(C, momentum=0.5, axis_name='devices', rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  x = _x(shape=(2, 6, C)) + jnp.arange(2.0)[:, None, None]  # 2 "devices" of 6 examples
  masks = jnp.stack([jnp.arange(6) < 2, jnp.arange(6) < 6])  # 2 and 6 valid examples

  def device(x, mask):
    copy = nnx.merge(graphdef, state, copy=True)
    return copy(x, mask=mask), nnx.state(copy, nnx.BatchStat)

  ys, stats = jax.vmap(device, axis_name='devices')(x, masks)
  valid = np.concatenate([np.asarray(x[0, :2], np.float64), np.asarray(x[1], np.float64)])
  np.testing.assert_allclose(stats['mean'][...][0], 0.5 * valid.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['var'][...][1], 0.5 + 0.5 * valid.var(0), rtol=1e-5)
  np.testing.assert_allclose(ys[1], (x[1] - valid.mean(0)) / np.sqrt(valid.var(0) + 1e-5), rtol=1e-4, atol=1e-4)
