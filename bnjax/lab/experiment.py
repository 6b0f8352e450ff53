"""One training run, end to end: data -> model -> epochs -> metrics, plots, checkpoints.

    summary = bnjax.lab.experiment.run(config)

Outputs in `config.workdir` (when set):
- `config.json`: every resolved hyperparameter, jax/flax versions, device kind;
- `metrics.jsonl`: one line per epoch: train loss/accuracy, validation
  loss/accuracy, seconds, examples/s;
- `summary.json`: final and best validation accuracy, test accuracy (with the
  moving statistics and with batch statistics), times, status
  (completed | diverged);
- `curves.png`: loss and accuracy per epoch;
- `checkpoints/`: Orbax checkpoints of the training state; `resume=True`
  continues from the latest and ends with exactly the metrics of an
  uninterrupted run.

With several devices (`config.num_devices`, default every device of every
process) the steps run data-parallel (`bnjax.lab.parallel`): the state and data
are replicated, each device trains on its slice of every global batch. In a
multi-process run every process runs this same function; process 0 writes the
files above, and Orbax coordinates the checkpoints.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from bnjax.lab import build, diagnostics, engine, parallel, plots
from bnjax.lab.config import TrainConfig
from bnjax.lab.data import augment_cifar

STATUS_COMPLETED = 'completed'
STATUS_DIVERGED = 'diverged'


class Interrupted(RuntimeError):
  """Raised after the checkpoint of `interrupt_after_epoch` (fault injection for resume tests)."""


def write_json(path: Path, value: Any) -> None:
  """Writes JSON atomically (a reader never sees a half-written file)."""
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + '\n')
  os.replace(tmp, path)


def environment() -> dict[str, Any]:
  """Versions and hardware, recorded beside every result."""
  device = jax.devices()[0]
  return {
      'jax': jax.__version__,
      'jaxlib': jax.lib.__version__ if hasattr(jax.lib, '__version__') else None,
      'flax': flax.__version__,
      'optax': optax.__version__,
      'python': platform.python_version(),
      'platform': device.platform,
      'device_kind': device.device_kind,
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      'command': ' '.join(sys.argv),
  }


def _finite(value: float) -> bool:
  return math.isfinite(value)


def _checkpoint_manager(workdir: Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      (workdir / 'checkpoints').absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=2)
  )


def _restore(manager: ocp.CheckpointManager, state: engine.TrainState):
  """`(state, history)` of the latest checkpoint, or None."""
  epoch = manager.latest_step()
  if epoch is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = manager.restore(
      epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore())
  )
  return restored.state, restored.history['epochs']


class _Timer:
  def __init__(self):
    self.start = time.perf_counter()

  def seconds(self) -> float:
    return time.perf_counter() - self.start


def run(
    config: TrainConfig,
    *,
    dataset=None,
    resume: bool = False,
    interrupt_after_epoch: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Trains one model as `config` says and returns its summary (also written to the workdir).

  Args:
    config: a validated `TrainConfig`.
    dataset: an already loaded `bnjax.lab.data.Dataset` with device arrays (e.g.
      shared by the runs of a preset); loaded from the config when None.
    resume: continue from the latest checkpoint in `config.workdir`, if any.
    interrupt_after_epoch: fault injection: stop with `Interrupted` right
      after that epoch's checkpoint (tests use it to check resuming).
    progress: show a tqdm progress bar per epoch.
    log: where the one-line messages go.
  """
  total_timer = _Timer()
  num_devices = parallel.resolve_num_devices(config.num_devices)
  mesh = parallel.make_mesh(num_devices) if num_devices > 1 else None
  if mesh is not None:
    parallel.per_device_batch(config.batch_size, num_devices)  # fail before loading anything
  writer = parallel.is_main_process()
  workdir = Path(config.workdir) if config.workdir else None
  if workdir and writer:
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(workdir / 'config.json', {
        'config': config.to_dict(), 'environment': dict(environment(), num_devices=num_devices)})
  if dataset is None:
    dataset = build.dataset(config, put=jax.device_put if mesh is None else None)
  if mesh is not None:
    dataset = parallel.replicate(dataset, mesh)
  num_train = dataset.train_images.shape[0]
  steps_per_epoch = build.steps_per_epoch(config, num_train)
  total_steps = build.total_steps(config, num_train)
  num_epochs = build.num_epochs(config, num_train)

  model = build.model(config)
  optimizer = build.optimizer(config, total_steps)
  state = engine.init_train_state(model, optimizer, config.seed, dataset.train_images[:1])
  augment = augment_cifar if config.augment else None
  step_loop = engine.step_loop_for(model, config.step_loop)
  options = dict(update_stats=config.update_stats, augment=augment, unroll=step_loop == 'python')
  if mesh is None:
    train_steps = jax.jit(engine.make_train_steps(model, optimizer, **options), donate_argnums=0)
  else:
    state = parallel.replicate(state, mesh)
    train_steps = jax.jit(
        parallel.make_train_steps(
            model, optimizer, mesh, batch_size=config.batch_size,
            cross_device_stats=config.cross_device_stats, **options,
        ),
        donate_argnums=0,
    )
  batches_of_epoch = jax.jit(engine.epoch_batches, static_argnums=(2, 3))
  evaluate_moving = jax.jit(engine.make_evaluate(model, batch_size=config.eval_batch_size))
  has_norm = config.norm != 'none'
  evaluate_batch = (
      jax.jit(engine.make_evaluate(model, batch_size=config.eval_batch_size, batch_stats_mode=True))
      if has_norm
      else evaluate_moving
  )
  evaluate_val = evaluate_batch if config.eval_stats == 'batch' else evaluate_moving

  history: list[dict[str, Any]] = []
  manager = _checkpoint_manager(workdir) if workdir and config.checkpoint_every else None
  start_epoch = 0
  if resume and manager is not None:
    restored = _restore(manager, state)
    if restored is not None:
      state, history = restored
      start_epoch = len(history)
      log(f'resumed from the checkpoint of epoch {start_epoch} in {workdir / "checkpoints"}')
  if workdir and writer:
    # Lines of epochs after the checkpoint belong to the interrupted attempt.
    (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(m) + '\n' for m in history))

  # Steps per jitted call; the host reads the metrics (progress bar, divergence) every `refresh` steps.
  refresh = max(1, math.ceil(steps_per_epoch / max(config.progress_updates, 1)))
  chunk = 1 if step_loop == 'python' else refresh
  compiled: dict[int, Callable] = {}
  compile_timer = _Timer()

  def train_chunk(batches):
    """The compiled scan for this many steps (compiled once per length, outside the epoch timing)."""
    if batches.shape[0] not in compiled:
      compiled[batches.shape[0]] = train_steps.lower(
          state, dataset.train_images, dataset.train_labels, batches
      ).compile()
    return compiled[batches.shape[0]]

  sample_batches = batches_of_epoch(state, 0, num_train, config.batch_size)
  for length in {min(chunk, steps_per_epoch), steps_per_epoch % chunk, total_steps % steps_per_epoch % chunk}:
    if length:
      train_chunk(sample_batches[:length])
  compile_seconds = compile_timer.seconds()
  status = STATUS_COMPLETED
  message = ''
  for epoch in range(start_epoch, num_epochs):
    epoch_timer = _Timer()
    steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
    batches = batches_of_epoch(state, epoch, num_train, config.batch_size)[:steps]
    totals = engine.zero_metrics()
    bar = tqdm(
        total=steps, desc=f'epoch {epoch + 1}/{num_epochs}', unit='step', leave=False,
        disable=not progress, file=sys.stderr, dynamic_ncols=True,
    )
    shown = 0
    for begin in range(0, steps, chunk):
      part_batches = batches[begin : begin + chunk]
      state, part = train_chunk(part_batches)(state, dataset.train_images, dataset.train_labels, part_batches)
      totals = engine.Metrics(*(a + b for a, b in zip(totals, part)))
      done = begin + part_batches.shape[0]
      if done - shown >= refresh or done == steps:
        running_loss = float(totals.mean_loss())
        bar.update(done - shown)
        shown = done
        bar.set_postfix(loss=f'{running_loss:.4f}', acc=f'{float(totals.accuracy()):.4f}')
        if not _finite(running_loss):
          break
    bar.close()
    train_loss, train_accuracy = float(totals.mean_loss()), float(totals.accuracy())
    train_seconds = epoch_timer.seconds()
    if not _finite(train_loss):
      status = STATUS_DIVERGED
      message = f'diverged in epoch {epoch + 1}: training loss is {train_loss} (try a smaller --learning_rate)'
      log(message)
      break
    val = evaluate_val(state, dataset.val_images, dataset.val_labels)
    metrics = {
        'epoch': epoch + 1,
        'step': int(state.step),
        'train_loss': train_loss,
        'train_accuracy': train_accuracy,
        'val_loss': float(val.mean_loss()),
        'val_accuracy': float(val.accuracy()),
        'seconds': train_seconds,
        'examples_per_second': steps * config.batch_size / train_seconds,
        'eval_seconds': epoch_timer.seconds() - train_seconds,
    }
    history.append(metrics)
    log(
        f'epoch {epoch + 1:3d}/{num_epochs}  train loss {train_loss:.4f} acc {train_accuracy:.4f}  '
        f'val loss {metrics["val_loss"]:.4f} acc {metrics["val_accuracy"]:.4f}  '
        f'{train_seconds:.1f}s ({metrics["examples_per_second"]:,.0f} ex/s)'
    )
    if workdir and writer:
      with open(workdir / 'metrics.jsonl', 'a') as f:
        f.write(json.dumps(metrics) + '\n')
    last = epoch + 1 == num_epochs
    if manager is not None and ((epoch + 1) % config.checkpoint_every == 0 or last):
      manager.save(
          epoch + 1,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state), history=ocp.args.JsonSave({'epochs': history})),
      )
      manager.wait_until_finished()
    if interrupt_after_epoch is not None and epoch + 1 == interrupt_after_epoch and not last:
      raise Interrupted(f'interrupted after epoch {epoch + 1} (fault injection)')

  summary: dict[str, Any] = {
      'status': status, 'epochs_completed': len(history), 'steps': int(state.step), 'step_loop': step_loop,
  }
  if message:
    summary['message'] = message
  if status == STATUS_COMPLETED:
    test_moving = evaluate_moving(state, dataset.test_images, dataset.test_labels)
    test_batch = evaluate_batch(state, dataset.test_images, dataset.test_labels)
    summary.update(
        test_accuracy=float((test_batch if config.eval_stats == 'batch' else test_moving).accuracy()),
        test_loss=float((test_batch if config.eval_stats == 'batch' else test_moving).mean_loss()),
        test_accuracy_moving_stats=float(test_moving.accuracy()),
        test_accuracy_batch_stats=float(test_batch.accuracy()) if has_norm else None,
    )
    shift = jax.jit(functools.partial(diagnostics.variance_shift, model))(
        {'params': state.params, 'batch_stats': state.batch_stats},
        diagnostics.probe_examples(dataset.test_images, config.virtual_batch_size),
        jax.random.fold_in(state.rng, diagnostics.SHIFT_STREAM),
    )
    summary.update(diagnostics.shift_summary(shift))
  if history:
    best = max(history, key=lambda m: m['val_accuracy'])
    summary.update(
        final_val_accuracy=history[-1]['val_accuracy'],
        best_val_accuracy=best['val_accuracy'],
        best_epoch=best['epoch'],
        final_train_accuracy=history[-1]['train_accuracy'],
        train_seconds=sum(m['seconds'] for m in history),
    )
  summary['compile_seconds'] = compile_seconds
  summary['total_seconds'] = total_timer.seconds()
  if workdir and writer:
    write_json(workdir / 'summary.json', summary)
    if history:
      plots.plot_curves({config.norm: history}, workdir / 'curves.png', title=f'{config.model} on {config.dataset}')
  return summary
