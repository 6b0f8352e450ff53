"""bnjax.schedules: momentum and renorm clipping schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import schedules


def test_inverse_decay_momentum_is_one_minus_tf_exponential_decay():
  schedule = bnjax.inverse_decay_momentum()
  steps = np.arange(0, 200, 7)
  expected = 1.0 - 0.8 ** (steps / 10.0)  # 1 - tf.train.exponential_decay(1., step, 10, 0.8)
  np.testing.assert_allclose(jax.vmap(schedule)(jnp.asarray(steps)), expected, rtol=1e-5, atol=1e-7)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10_000)) == 1.0  # uncapped, it freezes the moving statistics: hence the cap


def test_inverse_decay_momentum_cap():
  capped = bnjax.inverse_decay_momentum(max_momentum=0.9)
  np.testing.assert_allclose(capped(10), 0.2, rtol=1e-6)
  np.testing.assert_allclose(capped(10_000), 0.9)


@pytest.mark.parametrize(
    'kwargs, message',
    [(dict(decay_rate=1.0), 'decay_rate'), (dict(decay_steps=0), 'decay_steps'), (dict(max_momentum=1.5), 'max_momentum')],
)
def test_inverse_decay_momentum_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    bnjax.inverse_decay_momentum(**kwargs)


def test_pytorch_momentum_conversion():
  assert bnjax.momentum_from_pytorch(0.1) == pytest.approx(0.9)
  assert bnjax.momentum_from_pytorch(None) is None  # PyTorch's cumulative average is ours
  params, state = bnjax.batch_norm_init(4)
  x = np.random.default_rng(0).normal(2.0, 1.0, (16, 4)).astype(np.float32)
  _, state = bnjax.batch_norm(x, params, state, training=True, momentum=bnjax.momentum_from_pytorch(0.1))
  # torch.nn.BatchNorm1d(momentum=0.1): running_mean = 0.9 * 0 + 0.1 * batch_mean.
  np.testing.assert_allclose(state.mean, 0.1 * x.mean(0), rtol=1e-5, atol=1e-6)


def test_renorm_clipping_warmup_follows_the_paper():
  rmax, dmax = bnjax.renorm_clipping_warmup()  # 5k warm-up, rmax 3 by 40k, dmax 5 by 25k
  for step, r, d in [(0, 1.0, 0.0), (5000, 1.0, 0.0), (22_500, 2.0, 4.375), (25_000, 2.0 + 2 / 35 * 2.5, 5.0), (40_000, 3.0, 5.0), (90_000, 3.0, 5.0)]:
    np.testing.assert_allclose(rmax(step), r, rtol=1e-5, err_msg=f'rmax at {step}')
    np.testing.assert_allclose(dmax(step), d, rtol=1e-5, err_msg=f'dmax at {step}')


@pytest.mark.parametrize(
    'kwargs, message',
    [(dict(warmup_steps=-1), 'warmup_steps'), (dict(rmax_end_step=10, warmup_steps=10), 'rmax_end_step'),
     (dict(rmax=0.5), 'rmax'), (dict(dmax=-1.0), 'dmax')],
)
def test_renorm_clipping_warmup_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    bnjax.renorm_clipping_warmup(**kwargs)


def test_as_schedule_keeps_callables_and_wraps_values():
  assert schedules.as_schedule(0.5)(123) == 0.5
  fn = lambda step: step * 2
  assert schedules.as_schedule(fn) is fn
