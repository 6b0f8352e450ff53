"""One of two processes (4 forced CPU devices each) training data-parallel on 127.0.0.1.

    python multiprocess_check.py <port> <process_id> <out.npz>

Every process runs the same program on the global mesh of 8 devices; process
0 writes the losses and final parameters to `out.npz` for the caller to
compare with the single-process run (`--single`: 1 device, no distributed).
Used by tests/test_parallel.py (XLA_FLAGS must be set before jax is imported).
"""

import sys

import numpy as np

from bnjax.lab import parallel

port, process_id, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if process_id >= 0:
  parallel.initialize(f'127.0.0.1:{port}', 2, process_id)

import jax  # noqa: E402

from bnjax.lab import build, engine  # noqa: E402
from bnjax.lab.config import TrainConfig  # noqa: E402

BATCH, STEPS = 64, 3
config = TrainConfig(model='mnist_mlp', norm='bn', batch_size=BATCH, learning_rate=0.1, optimizer='sgd')
rng = np.random.default_rng(0)
images = rng.normal(0.5, 1.0, (512, 28, 28, 1)).astype(np.float32)
labels = rng.integers(0, 10, 512).astype(np.int32)
model, optimizer = build.model(config), build.optimizer(config, STEPS)
state = engine.init_train_state(model, optimizer, config.seed, images[:BATCH])
if process_id >= 0:
  assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.device_count())
  mesh = parallel.make_mesh()
  step = jax.jit(engine.make_data_parallel_train_steps(model, optimizer, mesh, batch_size=BATCH))
  state, data = parallel.replicate((state, (images, labels)), mesh)
else:
  step = jax.jit(engine.make_train_steps(model, optimizer))
  data = (images, labels)
batches = jax.jit(engine.epoch_batches, static_argnums=(2, 3))(state, 0, images.shape[0], BATCH)
losses = []
for i in range(STEPS):
  state, metrics = step(state, *data, batches[i : i + 1])
  losses.append(float(metrics.mean_loss()))
print('process', process_id, 'losses', losses, flush=True)
if process_id <= 0:
  params = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
  stats = {'stats' + jax.tree_util.keystr(k): np.asarray(v)
           for k, v in jax.tree_util.tree_leaves_with_path(state.batch_stats)}
  np.savez(out, losses=np.array(losses), **params, **stats)
