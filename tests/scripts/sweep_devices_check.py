"""A vmapped sweep group with its lanes sharded over 8 forced CPU devices equals the same group on one device.

Run by tests/test_workers.py in a subprocess (XLA_FLAGS must be set before jax is imported):
    python sweep_devices_check.py DATA_DIR SWEEP_DIR
"""

import os
import sys

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bnjax.lab import build, loop, programs, sweep  # noqa: E402
from bnjax.lab import config as C  # noqa: E402

data_dir, sweep_dir = sys.argv[1], sys.argv[2]
assert jax.local_device_count() == 8
base = C.make(dict(data_dir=data_dir, data_source='files', batch_size=100, epochs=1, progress_updates=1,
                   dropout_placement='end', dropout_rate=0.2))
configs, _ = sweep.expand_grid(base, {'momentum': [0.6, 0.9, 0.99], 'seed': [0, 1, 2]})  # 9 lanes: 7 padded
dataset = build.dataset(base, put=jax.device_put)


def train(spread):
  program = programs.lanes(configs, dataset, spread=spread)
  result = loop.train(program, loop.Settings(progress=False, log=lambda m: None))
  summaries = loop.summarize(program, result)
  for summary, history in zip(summaries, result.histories):
    summary['history'] = history
  return program, summaries


spread, spread_summaries = train(True)
assert spread.num_lanes == 16 and spread.padding == 7 and len(spread_summaries) == 9
shards = {len(leaf.addressable_shards) for leaf in jax.tree.leaves(spread.state)}
assert shards == {8}, shards
assert {s.data.shape[0] for s in jax.tree.leaves(spread.state)[0].addressable_shards} == {2}  # 2 lanes per device
one, one_summaries = train(False)
assert one.padding == 0 and len(one_summaries) == 9
for a, b in zip(spread_summaries, one_summaries):
  # Float tolerance: a few of the 400 test examples may flip after an epoch of vmapped Adam.
  np.testing.assert_allclose(a['test_loss'], b['test_loss'], rtol=2e-3)
  for key in ('test_accuracy_moving_stats', 'test_accuracy_batch_stats', 'final_val_accuracy'):
    np.testing.assert_allclose(a[key], b[key], atol=0.01, err_msg=key)
  np.testing.assert_allclose([m['train_loss'] for m in a['history']], [m['train_loss'] for m in b['history']],
                             rtol=2e-3)
print('ok lanes on 8 devices equal one device')
records = sweep.run_sweep(configs, sweep_dir, report=False, log=lambda m: None)
assert len(records) == 9 and all(r['status'] == 'completed' for r in records)
print('ok sweep on 8 devices')
