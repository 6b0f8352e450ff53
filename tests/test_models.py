"""Tests for bnjax.lab.models: counts against Keras, every norm x dropout x position combination under
jit and grad, layer order through the probes, the pure-function reference, and vmap."""

import itertools
import os

os.environ.setdefault('KERAS_BACKEND', 'jax')

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax.lab import models, options, registry
from bnjax.linen import norm_state

MNIST = (8, 28, 28, 1)
CIFAR_SMALL = (8, 8, 8, 3)  # three 2x2 pools still fit; compiles fast
GHOST = dict(virtual_batch_size=4)  # divides the test batches of 8
# Small versions of the architectures for the combination grids: the blocks and steps of the
# real models, with fewer and narrower layers, so that each combination compiles in a second.
TINY_MLP = (('flatten',), ('dense', 16), ('dense', 8), ('dense', 12))
TINY_CNN = (('conv', 4), ('conv', 4), ('pool', 2), ('conv', 8), ('pool', 2), ('flatten',), ('dense', 16))


def _images(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def _init(model, x):
  # Eagerly: op by op reuses kernels compiled by earlier tests, where jit would compile each model.
  return model.init(jax.random.key(0), x)


def _train_apply(model, variables, x, seed=1, mutable=('batch_stats',), **kwargs):
  return model.apply(
      variables, x, train=True, rngs={'dropout': jax.random.key(seed)}, mutable=list(mutable), **kwargs
  )


# ----------------------------------------------------------------------------
# Registry and counts.


def test_registry_names_and_defaults():
  assert models.names() == registry.names()
  for name in models.names():
    config = models.defaults(name)
    assert set(config) == {'model', 'train'}
    assert config['train']['dataset'] in ('mnist', 'cifar10')
    assert isinstance(models.get(name, **config['model']), models.LabModel)
  config = models.defaults('mnist_mlp')
  config['train']['batch_size'] = 1
  assert models.defaults('mnist_mlp')['train'] == dict(  # the first copy was fresh
      dataset='mnist', optimizer='adam', learning_rate=1e-3, batch_size=500, epochs=20
  )
  assert models.defaults('cifar_cnn')['train']['learning_rate'] == 1e-4
  assert models.defaults('mlp_bn_paper')['model']['activation'] == 'sigmoid'


def test_the_model_choices_are_the_option_table_s():
  assert tuple(models.ACTIVATIONS) == options.OPTIONS['activation'].allowed()
  assert models.NORMS == tuple(options.NORM_KINDS)


INVALID_MODELS = [
    (('resnet',), {}, 'mnist_mlp, '),
    (('mnist_mlp',), dict(dropout_position='end'), 'dropout_placement'),
    (('mnist_mlp',), dict(norm='batchnorm'), "'renorm'"),
    (('mnist_mlp',), dict(dropout_placement='after'), "'after_norm'"),
    (('cifar_cnn',), dict(activation='gelu'), "'swish'"),
    (('mnist_mlp',), dict(norm='ghost'), 'virtual_batch_size'),
    (('mnist_mlp',), dict(norm='bn', virtual_batch_size=4), "norm='ghost'"),
    (('mnist_mlp',), dict(dropout_rate=1.0), 'dropout_rate'),
    (('mnist_mlp',), dict(layers=(('dense', 0),)), 'layers'),
]


@pytest.mark.parametrize('args, options, message', INVALID_MODELS, ids=[m for _, _, m in INVALID_MODELS])
def test_invalid_models_are_rejected_naming_the_option(args, options, message):
  with pytest.raises(ValueError, match=message):
    models.get(*args, **options)


# Keras's counts for the source's models (trainable, moving statistics).
COUNTS = {
    ('mnist_mlp', 'none'): (376_650, 0),
    ('mnist_mlp', 'bn'): (379_338, 2_688),
    ('cifar_cnn', 'bn'): (815_530, 1_408),
    ('cifar_cnn', 'none'): (815_530 - 1_408, 0),
    ('mnist_mlp', 'renorm'): (379_338, 2 * 2_688),  # mean, std, renorm mean, renorm std
}


@pytest.mark.parametrize('name, norm', list(COUNTS))
def test_parameter_counts(name, norm):
  model = models.get(name, norm=norm)
  shape = MNIST if name == 'mnist_mlp' else (1, 32, 32, 3)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  assert models.count_parameters(variables) == dict(zip(('trainable', 'moving_statistics'), COUNTS[name, norm]))


def _keras_counts(name, bn):
  keras = pytest.importorskip('keras')
  layers = keras.layers

  def block(layer):
    return [layer] + [layers.BatchNormalization()] * bn + [layers.Activation('relu')]

  if name == 'mnist_mlp':
    stack = [keras.Input((28, 28, 1)), layers.Flatten()]
    for width in (256, 128, 512, 64, 128, 256):
      stack += block(layers.Dense(width))
  else:
    stack = [keras.Input((32, 32, 3))]
    for channels in (32, 64, 128):
      stack += block(layers.Conv2D(channels, 3, padding='same'))
      stack += block(layers.Conv2D(channels, 3, padding='same')) + [layers.MaxPooling2D(2)]
    stack += [layers.Flatten()] + block(layers.Dense(256))
  model = keras.Sequential(stack + [layers.Dense(10)])
  size = lambda weights: sum(int(np.prod(w.shape)) for w in weights)
  return size(model.trainable_weights), size(model.non_trainable_weights)


@pytest.mark.parametrize('name', ['mnist_mlp', 'cifar_cnn'])
def test_counts_equal_keras(name):
  for norm, bn in (('none', 0), ('bn', 1)):
    model = models.get(name, norm=norm)
    shape = MNIST if name == 'mnist_mlp' else (1, 32, 32, 3)
    counts = models.count_parameters(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape)))
    assert (counts['trainable'], counts['moving_statistics']) == _keras_counts(name, bn)


def test_center_scale_off_leave_norm_params_out():
  model = models.get('mlp_bn_paper', norm_position='after_activation', center=False, scale=False)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(MNIST))
  assert all(f'norm_{i}' not in variables['params'] for i in range(3))
  assert set(variables['batch_stats']) == {'norm_0', 'norm_1', 'norm_2'}


# ----------------------------------------------------------------------------
# Every combination compiles, differentiates and updates its statistics.


def _norm_options(norm):
  return {'ghost': GHOST, 'group': dict(num_groups=4)}.get(norm, {})  # 4 groups divide the tiny widths


def _grad_fn(model, x):
  """variables -> (gradient of a cross-entropy w.r.t. params, (logits, batch_stats updates))."""

  def grad(variables):
    def loss(params):
      logits, updates = _train_apply(model, {**variables, 'params': params}, x)
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0]), (logits, updates)

    return jax.grad(loss, has_aux=True)(variables['params'])

  return grad


def _check_jit_grad(model, x, norm):
  variables = _init(model, x)
  grads, (logits, updates) = jax.jit(_grad_fn(model, x))(variables)
  assert logits.shape == (x.shape[0], 10)
  assert jax.tree.structure(grads) == jax.tree.structure(variables['params'])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.any(grads['head']['kernel'] != 0) and np.any(grads['linear_0']['kernel'] != 0)
  if not options.NORM_KINDS[norm].moving_statistics:
    assert 'batch_stats' not in variables
  else:
    before = variables['batch_stats']
    assert all(np.any(stats['mean'] != before[name]['mean']) for name, stats in updates['batch_stats'].items())


@pytest.mark.parametrize(
    'norm, placement, position',
    list(itertools.product(models.NORMS, models.DROPOUT_PLACEMENTS, models.NORM_POSITIONS)),
)
def test_mlp_jit_and_grad_every_combination(norm, placement, position):
  model = models.get(
      'mnist_mlp', layers=TINY_MLP, norm=norm, dropout_placement=placement, norm_position=position,
      **_norm_options(norm),
  )
  _check_jit_grad(model, _images(MNIST), norm)


@pytest.mark.parametrize(
    'norm, placement, position',
    [('none', 'end', 'before_activation'), ('bn', 'before_norm', 'after_activation'),
     ('renorm', 'after_norm', 'before_activation'), ('ghost', 'before_norm', 'before_activation')],
)
def test_cnn_jit_and_grad(norm, placement, position):
  model = models.get(
      'cifar_cnn', layers=TINY_CNN, norm=norm, dropout_placement=placement, norm_position=position,
      activation='swish', **_norm_options(norm),
  )
  _check_jit_grad(model, _images(CIFAR_SMALL), norm)


@pytest.mark.parametrize('name, shape', [('mnist_mlp', (3, 28, 28)), ('mlp_bn_paper', (3, 28, 28, 1)),
                                         ('cifar_cnn', (2, 32, 32, 3))])
def test_output_shapes(name, shape):
  model = models.get(name)
  logits = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], jnp.zeros(shape))
  assert logits.shape == (shape[0], 10)


# ----------------------------------------------------------------------------
# Layer order, seen through the probes.


def _probe_sites(probes, position):
  """The probed values in network order: (block, site) pairs."""
  order = ('norm_input', 'activation_input') if position == 'before_activation' else (
      'activation_input', 'norm_input'
  )
  return [(block, site) for block in sorted(probes) for site in order]


# The first place that sees dropout: the site right after the dropout layer.
FIRST_DROPPED = {
    ('before_norm', 'before_activation'): ('block_0', 'norm_input'),
    ('before_norm', 'after_activation'): ('block_0', 'norm_input'),  # after the activation, right before norm
    ('after_norm', 'before_activation'): ('block_1', 'norm_input'),
    ('after_norm', 'after_activation'): ('block_1', 'activation_input'),
    ('end', 'before_activation'): 'logits',
    ('end', 'after_activation'): 'logits',
    ('none', 'before_activation'): None,
    ('none', 'after_activation'): None,
}


@pytest.mark.parametrize('norm', ['bn', 'none'])
@pytest.mark.parametrize('placement, position', list(FIRST_DROPPED))
def test_dropout_placement_order_through_probes(norm, placement, position):
  model = models.get('mnist_mlp', layers=TINY_MLP, norm=norm, dropout_placement=placement, norm_position=position)
  x = _images(MNIST)
  variables = _init(model, x)

  def run(rate):
    logits, state = model.apply(
        variables, x, train=True, hparams={'dropout_rate': rate}, rngs={'dropout': jax.random.key(3)},
        mutable=['batch_stats', 'probes'],
    )
    return logits, state['probes']

  logits_off, probes_off = run(0.0)
  logits_on, probes_on = run(0.5)
  changed = [
      (block, site) for block, site in _probe_sites(probes_on, position)
      if not np.array_equal(probes_on[block][site]['var'], probes_off[block][site]['var'])
  ]
  first = FIRST_DROPPED[placement, position]
  if first is None:
    assert not changed and np.array_equal(logits_on, logits_off)
  elif first == 'logits':
    assert not changed and not np.allclose(logits_on, logits_off)
  else:
    sites = _probe_sites(probes_on, position)
    assert changed == sites[sites.index(first):]


@pytest.mark.parametrize('position', models.NORM_POSITIONS)
def test_norm_position_through_probes(position):
  model = models.get('mnist_mlp', layers=TINY_MLP, norm_position=position, activation='relu')
  x = _images(MNIST)
  _, state = _train_apply(model, _init(model, x), x, mutable=['batch_stats', 'probes'])
  for block in state['probes'].values():
    normalized = block['activation_input' if position == 'before_activation' else 'norm_input']
    if position == 'before_activation':  # the activation sees the normalized values
      variance = block['norm_input']['var']
      np.testing.assert_allclose(normalized['mean'], 0.0, atol=1e-5)
      np.testing.assert_allclose(normalized['var'], variance / (variance + 1e-3), rtol=1e-4)
    else:  # the norm layer sees ReLU outputs, the activation the linear layer's
      assert np.all(normalized['mean'] >= 0) and np.all(normalized['percentiles'] >= 0)
      assert np.any(block['activation_input']['percentiles'] < 0)


# ----------------------------------------------------------------------------
# Numbers: the model is the pure functions, and the probes measure what they say.


def _pure_forward(variables, x, norm_fn, options):
  """mlp_bn_paper in training mode from bnjax.batch_norm / batch_renorm; returns logits, states, sites."""
  params, stats = variables['params'], variables['batch_stats']
  h = x.reshape(x.shape[0], -1)
  states, sites = {}, {}
  for i in range(3):
    h = h @ params[f'linear_{i}']['kernel'] + params[f'linear_{i}']['bias']
    norm_input = h
    h, state = norm_fn(h, params[f'norm_{i}'], norm_state(stats[f'norm_{i}']), training=True, **options)
    states[f'norm_{i}'] = {field: getattr(state, field) for field in stats[f'norm_{i}']}  # what the layer stores
    sites[f'block_{i}'] = {'norm_input': norm_input, 'activation_input': h}
    h = jax.nn.sigmoid(h)
  return h @ params['head']['kernel'] + params['head']['bias'], states, sites


@pytest.mark.parametrize('norm', ['bn', 'ghost', 'renorm'])
def test_model_equals_pure_functions_and_probes_are_right(norm):
  options = dict(momentum=0.9, epsilon=1e-2, **_norm_options(norm))
  if norm == 'renorm':
    options.update(rmax=1.5, dmax=0.5, renorm_momentum=0.8)
  model = models.get('mlp_bn_paper', norm=norm, **options)
  x = _images(MNIST)
  variables = _init(model, x)
  logits, state = model.apply(variables, x, train=True, mutable=['batch_stats', 'probes'], probe_unit=7)
  norm_fn = bnjax.batch_renorm if norm == 'renorm' else bnjax.batch_norm
  ref_logits, ref_states, ref_sites = _pure_forward(variables, x, norm_fn, options)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state['batch_stats'], ref_states)
  for block, sites in ref_sites.items():
    for site, value in sites.items():
      probe = state['probes'][block][site]
      value = np.asarray(value)
      np.testing.assert_allclose(probe['mean'], value.mean(0), rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(probe['var'], value.var(0), rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(probe['percentiles'], np.percentile(value[:, 7], [15, 50, 85]), rtol=1e-5, atol=1e-6)


def test_probes_do_not_change_the_output_and_cost_nothing_when_off():
  model = models.get('mnist_mlp', layers=TINY_MLP, dropout_placement='after_norm')
  x = _images(MNIST)
  variables = _init(model, x)
  assert 'probes' not in variables
  plain, _ = _train_apply(model, variables, x)
  probed, state = _train_apply(model, variables, x, mutable=['batch_stats', 'probes'], probe_unit=3)
  np.testing.assert_array_equal(plain, probed)
  assert [state['probes'][f'block_{i}']['norm_input']['var'].shape for i in range(3)] == [(16,), (8,), (12,)]
  jaxpr = str(jax.make_jaxpr(lambda v: _train_apply(model, v, x))(variables))
  assert 'sort' not in jaxpr  # no percentiles computed
  with pytest.raises(ValueError, match='probe_unit=8'):
    model.apply(variables, x, mutable=['probes'], probe_unit=8)


def test_conv_probes_reduce_over_batch_and_positions():
  model = models.get('cifar_cnn', layers=TINY_CNN)
  x = _images(CIFAR_SMALL)
  variables = _init(model, x)
  _, state = jax.jit(lambda v: model.apply(
      v, x, train=True, mutable=['batch_stats', 'probes', 'intermediates'], probe_unit=2,
      capture_intermediates=lambda module, method: module.name == 'linear_0',
  ))(variables)
  (conv_out,) = state['intermediates']['linear_0']['__call__']  # [N, H, W, 4]: norm_0's input
  probe = state['probes']['block_0']['norm_input']
  conv_out = np.asarray(conv_out)
  np.testing.assert_allclose(probe['mean'], conv_out.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(probe['var'], conv_out.var((0, 1, 2)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      probe['percentiles'], np.percentile(conv_out[..., 2], [15, 50, 85]), rtol=1e-5, atol=1e-6
  )


def test_evaluation_is_deterministic_training_is_stochastic():
  model = models.get('mlp_bn_paper', dropout_placement='after_norm', dropout_rate=0.3)
  x = _images(MNIST)
  variables = _init(model, x)
  eval_a = model.apply(variables, x)
  eval_b = model.apply(variables, x, rngs={'dropout': jax.random.key(5)})
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a, _ = _train_apply(model, variables, x, seed=1)
  train_a2, _ = _train_apply(model, variables, x, seed=1)
  train_b, _ = _train_apply(model, variables, x, seed=2)
  np.testing.assert_array_equal(train_a, train_a2)
  assert not np.allclose(train_a, train_b)


# ----------------------------------------------------------------------------
# vmap: over parameter sets, and over hyperparameter values.


@pytest.mark.parametrize('name, shape', [('mnist_mlp', MNIST), ('cifar_cnn', CIFAR_SMALL)])
def test_vmap_over_parameter_sets(name, shape):
  # The full models: gradients of three parameter sets in one program (so also jit and grad of the real models).
  model = models.get(name, dropout_placement='end')
  x = _images(shape)
  # Three parameter sets: the initial one and two perturbed by noise (numpy's: no compilation).
  variables = _init(model, x)
  rng = np.random.default_rng(0)
  stacked = jax.tree.map(
      lambda a: np.stack([a] + [a + 0.1 * rng.standard_normal(a.shape, np.float32) for _ in range(2)]),
      variables['params'],
  )
  stacked = {'params': stacked, 'batch_stats': jax.tree.map(lambda a: np.stack([a] * 3), variables['batch_stats'])}
  grad = _grad_fn(model, x)
  grads, (logits, updates) = jax.jit(jax.vmap(grad))(stacked)
  assert logits.shape == (3, shape[0], 10)
  for k in range(3):
    member_grads, (member_logits, member_updates) = jax.jit(grad)(jax.tree.map(lambda a: a[k], stacked))
    np.testing.assert_allclose(logits[k], member_logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads['head']['kernel'][k], member_grads['head']['kernel'], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        updates['batch_stats']['norm_0']['var'][k], member_updates['batch_stats']['norm_0']['var'], rtol=1e-5
    )
  assert not np.allclose(logits[0], logits[1])


def test_vmap_over_momentum_and_dropout_rate_hparams():
  model = models.get('mlp_bn_paper', norm='renorm', dropout_placement='before_norm')
  x = _images(MNIST)
  variables = _init(model, x)
  hparams = {'momentum': jnp.array([0.0, 0.5, 0.99]), 'dropout_rate': jnp.array([0.0, 0.2, 0.5]),
             'rmax': jnp.array([1.0, 2.0, 3.0])}
  stacked = jax.tree.map(lambda a: jnp.stack([a] * 3), variables)
  step = jax.jit(jax.vmap(lambda v, hp: _train_apply(model, v, x, hparams=hp)))
  logits, updates = step(stacked, hparams)
  for k in range(3):
    values = {key: float(value[k]) for key, value in hparams.items()}
    # The same values as fields of a model built for them.
    member = models.get('mlp_bn_paper', norm='renorm', dropout_placement='before_norm', **values)
    member_logits, member_updates = _train_apply(member, variables, x)
    np.testing.assert_allclose(logits[k], member_logits, rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[k], b, rtol=1e-5, atol=1e-6), updates, member_updates)
  means = updates['batch_stats']['norm_0']['mean']
  assert not np.allclose(means[0], means[2])
  with pytest.raises(ValueError, match='momentun'):
    _train_apply(model, variables, x, hparams={'momentun': 0.9})


def test_vmap_over_momentum_given_as_a_field():
  # A model built inside the vmapped function may hold the traced value as its field.
  x = _images(MNIST)
  variables = _init(models.get('mlp_bn_paper'), x)

  def step(momentum):
    return _train_apply(models.get('mlp_bn_paper', momentum=momentum), variables, x)[1]

  updates = jax.vmap(step)(jnp.array([0.0, 0.9]))
  batch_mean = _pure_forward(variables, x, bnjax.batch_norm, dict(momentum=0.0))[1]['norm_0']['mean']
  np.testing.assert_allclose(updates['batch_stats']['norm_0']['mean'][0], batch_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['norm_0']['mean'][1], 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
