"""PyTorch's BatchNorm and bnjax's: the correspondence, and its state dict in and out (no torch import).

`torch.nn.BatchNorm1d/2d/3d(C, eps, momentum, affine, track_running_stats)`
is `bnjax.batch_norm` (or `bnjax.linen.BatchNorm`, `bnjax.nnx.BatchNorm`)
with, on channels-last inputs (`x.permute(0, 2, 3, 1)` for NCHW):

    eps=1e-5                  epsilon=1e-5
    momentum=0.1              momentum=momentum_from_pytorch(0.1) == 0.9 (the weight of the old average)
    momentum=None             momentum=None (the cumulative average, both)
    affine=False              center=False, scale=False (linen/nnx: use_bias=False, use_scale=False)
    running_var (unbiased)    unbiased_moving_var=True
    track_running_stats=False training=True in evaluation too (linen/nnx: use_running_average=False
                              always), the state dropped: the batch statistics every time
    model.train() / .eval()   training=True / False (linen: use_running_average; nnx: .train() / .eval())

PyTorch's `running_var` averages the *unbiased* batch variance
`var_B * n / (n - 1)` (n the entries per channel: N for `[N, C]`, N*H*W for
images), while it normalizes a training batch with the biased var_B; bnjax
(as Keras and Flax) averages the biased one unless `unbiased_moving_var=True`.
With it, and the settings above, bnjax's outputs and moving statistics are
PyTorch's step for step (`tests/test_torch_interop.py`). Without it the
moving variance is n / (n - 1) smaller than PyTorch's: 7/8 for a dense
layer at batch 8, 255/256 for 8x8 feature maps at batch 4.

`from_torch_state_dict` reads a BN layer's state dict (`weight`, `bias`,
`running_mean`, `running_var`, `num_batches_tracked`; tensors or numpy
arrays, anything `np.asarray` takes: torch is not imported) into bnjax
params and state; `to_torch_state_dict` writes them back as numpy arrays
for `load_state_dict` (`torch.from_numpy` each, or `torch.as_tensor`).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from bnjax import layers
from bnjax import norm as norm_lib

# PyTorch's names -> bnjax's.
PARAM_NAMES = {'weight': 'scale', 'bias': 'bias'}
STATE_NAMES = {'running_mean': 'mean', 'running_var': 'var', 'num_batches_tracked': 'step'}


def from_torch_state_dict(
    state_dict: Mapping[str, Any], prefix: str = ''
) -> tuple[dict, norm_lib.BatchNormState]:
  """A torch BatchNorm layer's state dict as bnjax `(params, BatchNormState)`.

      params, state = from_torch_state_dict(torch_bn.state_dict())
      y, _ = bnjax.batch_norm(x_nhwc, params, state, training=False, epsilon=torch_bn.eps)
      # linen: {'params': params, 'batch_stats': {'mean': state.mean, 'var': state.var}}
      # nnx:   layer.mean[...], layer.var[...] = state.mean, state.var; layer.scale[...] = params['scale']; ...

  Args:
    state_dict: `running_mean`, `running_var` (and `weight`, `bias` when
      affine, `num_batches_tracked` when tracked) under `prefix`; values are
      torch tensors on the CPU, numpy arrays or anything `np.asarray` takes.
      Other keys are ignored, so a whole model's state dict will do with
      the layer's `prefix` (e.g. `'layer1.0.bn1.'`).
    prefix: the layer's prefix in `state_dict`.

  Returns:
    `params` with `scale`/`bias` (float32; those present), and the state:
    `mean`, `var` = PyTorch's running statistics (float32), `step` =
    `num_batches_tracked` (0 if absent), `decay_product` 1.

  Raises:
    ValueError: no `running_mean`/`running_var` under `prefix` (a layer
      built with `track_running_stats=False` has none: it has no state to
      load, see the module doc).
  """
  def get(name):
    # A copy: np.asarray of a CPU tensor (and jnp.asarray of that) may share the tensor's memory, which
    # torch updates in place when the layer trains on.
    value = state_dict.get(prefix + name)
    return None if value is None else np.array(value, copy=True)

  missing = [name for name in ('running_mean', 'running_var') if get(name) is None]
  if missing:
    raise ValueError(
        f'from_torch_state_dict: no {", ".join(prefix + name for name in missing)} in the state dict (keys: '
        f'{sorted(state_dict)[:8]}...); pass the prefix of a BatchNorm layer with track_running_stats=True.'
    )
  params = {ours: jnp.asarray(get(theirs), jnp.float32) for theirs, ours in PARAM_NAMES.items()
            if get(theirs) is not None}
  step = get('num_batches_tracked')
  state = norm_lib.BatchNormState(
      mean=jnp.asarray(get('running_mean'), jnp.float32),
      var=jnp.asarray(get('running_var'), jnp.float32),
      step=jnp.asarray(0 if step is None else int(step), jnp.int32),
      decay_product=jnp.ones((), jnp.float32),
  )
  return params, state


def to_torch_state_dict(
    params: Mapping[str, Any], state: norm_lib.BatchNormState | Mapping[str, Any], prefix: str = ''
) -> dict[str, np.ndarray]:
  """bnjax params and state as a torch BatchNorm layer's state dict of numpy arrays.

      numpy_dict = to_torch_state_dict(params, state)   # or a linen layer's batch_stats / nnx layer's values
      torch_bn.load_state_dict({k: torch.from_numpy(v) for k, v in numpy_dict.items()})

  Args:
    params: `scale` and/or `bias` (left out of the dict when absent: a
      layer with `affine=False`).
    state: a `BatchNormState`, or one layer's stored statistics (a
      `bnjax.linen.BatchNorm`'s `batch_stats` entry; `step` 0 when not stored).
    prefix: put before every key.

  Returns:
    `{prefix + 'weight', 'bias', 'running_mean', 'running_var',
    'num_batches_tracked'}`: float32 arrays, the count int64 (as torch's).
  """
  if isinstance(state, Mapping):
    state = layers.as_state(norm_lib.BatchNormState, state)
  # Writable copies (a jax array viewed by numpy is read-only; torch.from_numpy warns about those).
  result = {prefix + theirs: np.array(params[ours], np.float32) for theirs, ours in PARAM_NAMES.items()
            if ours in params}
  result[prefix + 'running_mean'] = np.array(state.mean, np.float32)
  result[prefix + 'running_var'] = np.array(state.var, np.float32)
  result[prefix + 'num_batches_tracked'] = np.array(state.step, np.int64)
  return result
