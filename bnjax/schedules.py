"""Schedules: hyperparameters as functions of the update step.

A schedule is any callable `step -> value` (the same contract as optax
schedules, so `optax.linear_schedule(...)` etc. work too). Every BN
hyperparameter that may change during training (momentum, renorm momentum,
rmax, dmax) accepts either a number or a schedule; the functions in
`bnjax.norm` call the schedule with the state's `step`, the number of
training updates applied to that state so far (0 on the first update).

Momentum convention (Keras/Flax): the moving average is updated as
`new = momentum * old + (1 - momentum) * batch`, so high momentum means slow,
smooth averages. PyTorch's `momentum` is the weight of the *batch*:
`momentum_from_pytorch(0.1) == 0.9`.
"""

from __future__ import annotations

from typing import Callable, Union

import jax.numpy as jnp

Array = jnp.ndarray
Schedule = Callable[[Array], Array]
ScalarOrSchedule = Union[float, Array, Schedule]


def as_schedule(value: ScalarOrSchedule) -> Schedule:
  """Returns `value` if it is already a schedule, else a constant schedule.

  Arrays (including tracers, e.g. a momentum that is being vmapped over) are
  treated as constants, so sweeps can batch over hyperparameter values.
  """
  if callable(value):
    return value
  return lambda step: value


def momentum_from_pytorch(pytorch_momentum: float | None) -> float | None:
  """Converts PyTorch's BN momentum (weight of the batch) to ours (weight of the past).

  PyTorch: `running = (1 - m) * running + m * batch`, default m = 0.1.
  bnjax (Keras/Flax): `moving = m * moving + (1 - m) * batch`.
  So PyTorch's 0.1 is 0.9 here. PyTorch's `momentum=None` (cumulative moving
  average) is `momentum=None` here too.
  """
  if pytorch_momentum is None:
    return None
  return 1.0 - pytorch_momentum


def inverse_decay_momentum(
    decay_rate: float = 0.8,
    decay_steps: float = 10.0,
    max_momentum: float | None = None,
) -> Schedule:
  """Momentum that starts at 0 and rises towards 1: `1 - decay_rate ** (step / decay_steps)`.

  This is the source material's schedule for large batches (TF's
  `1 - tf.train.exponential_decay(1., step, decay_steps, decay_rate)`): the
  first update copies the batch statistics (momentum 0), later updates average
  over ever longer windows. Without a cap the momentum reaches float32's 1.0
  after a few thousand steps and the moving statistics freeze;
  `max_momentum` (e.g. 0.99) caps it.

  Args:
    decay_rate: base of the decay, in (0, 1).
    decay_steps: steps over which `1 - momentum` shrinks by `decay_rate`.
    max_momentum: optional cap in [0, 1].
  """
  if not 0.0 < decay_rate < 1.0:
    raise ValueError(f'inverse_decay_momentum: decay_rate={decay_rate!r} must be in (0, 1).')
  if decay_steps <= 0:
    raise ValueError(f'inverse_decay_momentum: decay_steps={decay_steps!r} must be > 0.')
  if max_momentum is not None and not 0.0 <= max_momentum <= 1.0:
    raise ValueError(
        f'inverse_decay_momentum: max_momentum={max_momentum!r} must be in [0, 1] or None.'
    )

  def schedule(step):
    momentum = 1.0 - decay_rate ** (jnp.asarray(step, jnp.float32) / decay_steps)
    if max_momentum is not None:
      momentum = jnp.minimum(momentum, max_momentum)
    return momentum

  return schedule


def renorm_clipping_warmup(
    *,
    warmup_steps: int = 5000,
    rmax_end_step: int = 40000,
    dmax_end_step: int = 25000,
    rmax: float = 3.0,
    dmax: float = 5.0,
) -> tuple[Schedule, Schedule]:
  """The Batch Renormalization paper's clipping schedule (Ioffe 2017, section 4).

  rmax is 1 and dmax 0 (plain batch norm) for the first `warmup_steps`
  updates, then both are relaxed linearly, reaching `rmax` at step
  `rmax_end_step` and `dmax` at step `dmax_end_step`, and stay there. The
  paper's values: 5k warm-up, rmax 3 by 40k, dmax 5 by 25k steps.

  Returns:
    `(rmax_schedule, dmax_schedule)`, to pass as `batch_renorm(rmax=..., dmax=...)`.
  """
  if warmup_steps < 0:
    raise ValueError(f'renorm_clipping_warmup: warmup_steps={warmup_steps!r} must be >= 0.')
  for name, end in (('rmax_end_step', rmax_end_step), ('dmax_end_step', dmax_end_step)):
    if end <= warmup_steps:
      raise ValueError(
          f'renorm_clipping_warmup: {name}={end!r} must be after warmup_steps={warmup_steps!r}.'
      )
  if rmax < 1.0:
    raise ValueError(f'renorm_clipping_warmup: rmax={rmax!r} must be >= 1.')
  if dmax < 0.0:
    raise ValueError(f'renorm_clipping_warmup: dmax={dmax!r} must be >= 0.')
  rmax_schedule = linear_ramp(1.0, rmax, begin=warmup_steps, end=rmax_end_step)
  dmax_schedule = linear_ramp(0.0, dmax, begin=warmup_steps, end=dmax_end_step)
  return rmax_schedule, dmax_schedule


def linear_ramp(start_value: float, end_value: float, *, begin: int, end: int) -> Schedule:
  """`start_value` until step `begin`, then linear to `end_value` at step `end` (> begin), then constant.

  The same arithmetic as `optax.linear_schedule` (so the numbers of runs made
  with it stay), without importing optax into the core.
  """
  steps = end - begin

  def schedule(step):
    done = jnp.clip(jnp.asarray(step) - begin, 0, steps)
    return (start_value - end_value) * (1 - done / steps) + end_value

  return schedule
