"""Tests for bnjax.lab.registry and the models it opens: registry entries, models from user code by import path
(tests/user_models.py) through train.py and sweep.py, the one-line errors, ResNet-20 with its recipe as defaults,
norm layers found by type, and --norm_weight_decay."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnjax.lab import build, diagnostics, models, options, programs, registry, resnet
from bnjax.lab import config as C
from conftest import REPO

TESTS = str(REPO / 'tests')
MNIST = jnp.ones((4, 28, 28, 1))


def _cli(script, *flags, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      [str(REPO), TESTS] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  return subprocess.run([sys.executable, str(REPO / 'experiments' / script), *flags], capture_output=True,
                        text=True, timeout=timeout, cwd=REPO, env=env)


@pytest.fixture(autouse=True)
def _user_code_importable(monkeypatch):
  monkeypatch.syspath_prepend(TESTS)


# ----------------------------------------------------------------------------
# Models from user code, through the CLIs.


def test_a_user_linen_model_trains_through_a_vmapped_sweep(data_dir, tmp_path):
  # Two BN momenta: one group, two vmapped lanes, the momentum reaching the user's norm layer at call time.
  sweep = _cli('sweep.py', f'--data_dir={data_dir}', '--data_source=files', '--model=user_models:build',
               '--batch_size=100', '--steps=2', '--momentum=0.5,0.99', f'--sweep_dir={tmp_path}', '--report=false')
  assert sweep.returncode == 0, sweep.stderr[-3000:]
  assert '2 runs in 1 group(s)' in sweep.stdout and '2 completed' in sweep.stdout


def test_a_user_nnx_model_trains_through_train(data_dir, tmp_path):
  result = _cli('train.py', f'--data_dir={data_dir}', '--data_source=files', '--model=user_models:build_nnx',
                '--batch_size=100', '--steps=3', f'--workdir={tmp_path}', '--progress=false')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'completed' in result.stdout


def test_a_bad_import_path_is_one_line_on_the_cli():
  result = _cli('train.py', '--model=no_such_package.nets:build')
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0 and 'Traceback' not in result.stderr
  assert '--model=no_such_package.nets:build: cannot import no_such_package.nets' in result.stderr


# ----------------------------------------------------------------------------
# One-line errors, in process.

BAD_MODELS = [
    ('user_models:nope', "has no 'nope'"),
    ('user_models:NOT_A_BUILDER', 'not a builder'),
    ('user models', 'import path of a builder'),
]


@pytest.mark.parametrize('model, message', BAD_MODELS, ids=[m for m, _ in BAD_MODELS])
def test_bad_models_are_refused_in_one_line(model, message):
  with pytest.raises(ValueError, match=message) as error:
    C.make({'model': model})
  assert '\n' not in str(error.value) and '--model' in str(error.value)


def test_a_builder_that_raises_is_one_line():
  with pytest.raises(ValueError, match=r'--model=user_models:build_raises: its builder raised RuntimeError: this'):
    models.get('user_models:build_raises')


def test_a_model_without_norm_layers_where_a_norm_is_asked_for_is_refused():
  config = C.make({'model': 'user_models:build_without_norm', 'norm': 'bn'})
  with pytest.raises(ValueError, match='--norm=bn asks for norm layers, but --model=user_models:build_without_norm'):
    programs.checked_norm_paths(config, build.model(config), MNIST)
  none = C.make({'model': 'user_models:build_without_norm', 'norm': 'none'})
  assert programs.checked_norm_paths(none, build.model(none), MNIST) == []


def test_an_option_the_builder_does_not_take_is_refused_naming_the_flag():
  with pytest.raises(ValueError, match=r'--dropout_placement=.end.* --model=resnet20 \(its builder does not take'):
    C.make(C.with_model_defaults({'model': 'resnet20', 'dropout_placement': 'end', 'dropout_rate': 0.5}))
  with pytest.raises(ValueError, match='--activation=.sigmoid.'):
    C.make(C.with_model_defaults({'model': 'user_models:build_nnx', 'activation': 'sigmoid'}))
  with pytest.raises(ValueError, match="--conv_impl='cpu_fast' is invalid with --model=mnist_mlp"):
    models.get('mnist_mlp', conv_impl='cpu_fast')
  models.get('mnist_mlp', conv_impl=''.join(['x', 'la']))  # its default, as an equal string (read from JSON)


# ----------------------------------------------------------------------------
# ResNet-20 and the seed entries.


def test_resnet20_is_the_papers_network_with_its_recipe_as_defaults():
  model = models.get('resnet20', momentum=0.9, epsilon=1e-5)
  x = jnp.zeros((1, 32, 32, 3))
  ours = jax.eval_shape(model.init, jax.random.key(0), x)
  theirs = jax.eval_shape(resnet.ResNet(depth=20).init, jax.random.key(0), x)
  assert jax.tree.map(lambda a: a.shape, ours) == jax.tree.map(lambda a: a.shape, theirs)
  assert models.count_parameters(ours)['trainable'] == 269_722
  config = C.make(C.with_model_defaults({'model': 'resnet20'}))
  assert (config.dataset, config.optimizer, config.optimizer_momentum, config.learning_rate, config.lr_schedule,
          config.weight_decay, config.batch_size, config.augment, config.scaling) == (
              'cifar10', 'momentum', 0.9, 0.1, 'step', 1e-4, 128, True, 'standardize')
  # Every flag overrides; a length given replaces the recipe's epochs.
  short = C.make(C.with_model_defaults({'model': 'resnet20', 'steps': 10, 'weight_decay': 5e-4,
                                        'lr_schedule': 'cosine'}))
  assert (short.steps, short.epochs, short.weight_decay, short.lr_schedule) == (10, C.DEFAULTS.epochs, 5e-4, 'cosine')
  # A default the run does not use (BN momentum with group norm) is left out.
  group = C.make(C.with_model_defaults({'model': 'resnet20', 'norm': 'group', 'num_groups': 16}))
  assert group.momentum == C.DEFAULTS.momentum


def test_the_seed_models_defaults_leave_their_runs_unchanged():
  # mnist_mlp's own settings are the option table's defaults already.
  assert C.make(C.with_model_defaults({'model': 'mnist_mlp'})) == C.make({'model': 'mnist_mlp'})


def test_the_model_list_is_the_registry_s():
  assert registry.names() == ('mnist_mlp', 'cifar_cnn', 'mlp_bn_paper', 'resnet20', 'resnet32', 'resnet56')
  listed = ', '.join(registry.names())
  assert f'({listed})' in registry.MODEL_EXPECTED and f'registry: {listed})' in options.OPTIONS['model'].help
  with pytest.raises(ValueError, match=rf"--model='mlp' is invalid: expected a registered model \({listed}\)"):
    C.validate(C.TrainConfig(model='mlp'))


# ----------------------------------------------------------------------------
# Norm layers by type: probes, frozen BN, the weight-decay mask.


def test_norm_layers_are_found_by_type_whatever_their_name():
  model = models.get('user_models:build', momentum=0.0)
  x = jax.random.normal(jax.random.key(1), (16, 28, 28, 1))
  variables = model.init(jax.random.key(0), x)
  assert models.norm_layer_paths(model, x) == [('my_bn',)]
  # Frozen BN: training-mode output equals inference, the statistics stay.
  frozen, updates = model.apply(variables, x, train=True, freeze_norm=True, mutable=['batch_stats'])
  np.testing.assert_allclose(frozen, model.apply(variables, x), rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, updates['batch_stats'], variables['batch_stats'])
  # The variance-shift probes: one block per norm layer; with momentum 0, the moving variance is this batch's.
  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  shift = diagnostics.variance_shift(model, {**variables, **updates}, x, jax.random.key(2))
  np.testing.assert_allclose(shift['train_over_eval'], [1.0], rtol=1e-4)
  np.testing.assert_allclose(shift['moving_over_eval'], [1.0], rtol=1e-3)


def test_norm_weight_decay_false_masks_the_norm_parameters():
  base = {'model': 'user_models:build', 'optimizer': 'sgd', 'learning_rate': 1.0, 'weight_decay': 0.5}
  config = C.make({**base, 'norm_weight_decay': False})
  model = build.model(config)
  params = model.init(jax.random.key(0), MNIST)['params']
  optimizer = build.optimizer(config, 10, models.norm_layer_paths(model, MNIST))
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zero, optimizer.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new['my_bn']['scale'], params['my_bn']['scale'])  # not decayed
  np.testing.assert_allclose(new['hidden']['kernel'], 0.5 * params['hidden']['kernel'])  # decayed
  # Part of a run's identity only off its default; one line without weight decay.
  assert 'norm_weight_decay' in C.identity(config)
  assert 'norm_weight_decay' not in C.identity(C.make(base))
  with pytest.raises(ValueError, match=r'--norm_weight_decay=False is invalid: .*--weight_decay > 0'):
    C.make({'norm_weight_decay': False})


def test_sweeps_take_a_models_own_settings():
  from bnjax.lab import sweep

  # Each run's model gives the defaults of what was not given.
  grid = {'model': ['mnist_mlp', 'resnet20'], 'seed': [0]}
  configs, notes = sweep.expand_grid(C.unchecked({'steps': 5}), grid, given={'model', 'seed', 'steps'})
  assert not notes
  assert [(c.dataset, c.optimizer, c.steps) for c in configs] == [('mnist', 'adam', 5), ('cifar10', 'momentum', 5)]
