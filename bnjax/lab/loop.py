"""The training loop: the one epoch loop and the one summary builder, for every run, sweep group and study.

    program = programs.single(config, dataset)        # or programs.lanes(configs, dataset)
    result = loop.train(program, sinks=..., checkpoints=...)
    summaries = loop.summarize(program, result)       # one summary per lane

The loop sees K lanes (K = 1 for a single run): it takes each epoch's
batches, drives the compiled chunks of steps, refreshes the progress bar,
detects divergence per lane, evaluates, hands each lane's epoch metrics to
its sink (metrics.jsonl, TensorBoard: `bnjax.lab.rundir`) and checkpoints
the whole state after each epoch it is asked to, so that a resumed run ends
with exactly the numbers of an uninterrupted one.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from bnjax.lab import diagnostics, engine

STATUS_COMPLETED = 'completed'
STATUS_DIVERGED = 'diverged'
STATUS_ERROR = 'error'


class Interrupted(RuntimeError):
  """Raised after the checkpoint of `interrupt_after_epoch` (fault injection for resume tests)."""


class Result(NamedTuple):
  """What training produced: the final state, per lane the epoch history and the diverged epoch (or None)."""

  state: Any
  histories: list[list[dict]]
  diverged_epoch: list[int | None]
  compile_seconds: float
  precise_state: Any = None  # with --precise_bn: the state with the last evaluation's precise statistics


def _add(totals, part):
  return part if totals is None else engine.Metrics(*(a + b for a, b in zip(totals, part)))


def _warm_up(program, chunk: int) -> float:
  """Compiles the chunk lengths the run will use before any epoch is timed; returns the seconds."""
  start = time.perf_counter()
  plan = program.plan
  sample = program.epoch_batches(program.state, 0)
  lengths = {min(chunk, plan.steps_per_epoch), plan.steps_per_epoch % chunk,
             plan.total_steps % plan.steps_per_epoch % chunk}
  freezes = program.configs[0].freeze_bn_after is not None
  for length in sorted(l for l in lengths if l):
    for frozen in (False, True) if freezes else (False,):
      program.compile_chunk(program.state, sample[..., :length, :], frozen)
  return time.perf_counter() - start


def train(
    program,
    *,
    start_epoch: int = 0,
    histories: Sequence[list[dict]] | None = None,
    sinks: Sequence[Callable[[dict], None]] | None = None,
    checkpoint: Callable[[int, Any, list], None] | None = None,
    checkpoint_every: int = 0,
    progress_updates: int = 10,
    progress: bool = True,
    interrupt_after_epoch: int | None = None,
    every_steps: tuple[int, Callable[[int, Any], None]] | None = None,
    log: Callable[[str], None] = print,
) -> Result:
  """Trains the program's lanes from `start_epoch` to the end of its plan.

  Args:
    program: a `bnjax.lab.programs.Program` (its `state` is the start state).
    start_epoch, histories: where a resumed run stands (epochs done, and each
      lane's metrics of those epochs).
    sinks: per lane, `metrics -> None`, called after each epoch of a lane
      that has not diverged.
    checkpoint: `(epoch, state, histories) -> None`, called after every
      `checkpoint_every`-th epoch and the last.
    progress_updates: progress-bar refreshes (and divergence checks) per epoch.
    interrupt_after_epoch: fault injection: raise `Interrupted` right after
      that epoch's checkpoint.
    every_steps: `(n, hook)`: `hook(step, state)` at step 0 and after every
      n steps (and the last): measurements during training (the BN paper's
      Figure 1). The steps then run n at a time; n must divide an epoch's
      steps (or the run be shorter than an epoch).
  """
  plan = program.plan
  k = program.num_lanes
  histories = [list(h) for h in (histories or [[] for _ in range(k)])]
  diverged: list[int | None] = [None] * k
  # Steps per jitted call; the host reads the metrics (progress bar, divergence) every `refresh` steps.
  refresh = max(1, math.ceil(plan.steps_per_epoch / max(progress_updates, 1)))
  chunk = 1 if program.step_loop == 'python' else refresh
  if every_steps is not None:
    chunk = every_steps[0]
    if plan.steps_per_epoch % chunk and plan.total_steps > plan.steps_per_epoch:
      raise ValueError(f'every_steps={chunk} does not divide the {plan.steps_per_epoch} steps of an epoch.')
  compile_seconds = _warm_up(program, chunk)
  for config in program.runs[:1]:
    if config.precise_bn and precise_examples(plan, config) < config.precise_bn:
      log(f'--precise_bn={config.precise_bn} is capped at the {precise_examples(plan, config):,} examples of an '
          'epoch (recorded as precise_bn_examples in the summary)')
  state = program.state
  if every_steps is not None and start_epoch == 0:
    every_steps[1](0, state)
  config = program.configs[0]
  batch_size = config.batch_size
  precise_state = None
  for epoch in range(start_epoch, plan.num_epochs):
    timer = time.perf_counter()
    steps = min(plan.steps_per_epoch, plan.total_steps - epoch * plan.steps_per_epoch)
    batches = program.epoch_batches(state, epoch)[..., :steps, :]
    frozen = config.freeze_bn_after is not None and epoch >= config.freeze_bn_after
    if frozen and epoch == config.freeze_bn_after and config.precise_bn:
      # Wu & Johnson's FrozenBN: the frozen layers keep the population statistics of the weights at the freeze.
      state = program.precise(state, batches[..., : plan.precise_steps(config), :])
    totals = None
    bar = tqdm(total=steps, desc=f'epoch {epoch + 1}/{plan.num_epochs}', unit='step', leave=False,
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    shown = 0
    for begin in range(0, steps, chunk):
      part = batches[..., begin : begin + chunk, :]
      state, metrics = program.train_chunk(state, part, frozen)
      totals = _add(totals, metrics)
      done = begin + part.shape[-2]
      if every_steps is not None:
        step = epoch * plan.steps_per_epoch + done
        if step % every_steps[0] == 0 or step == plan.total_steps:
          every_steps[1](step, state)
      if done - shown >= refresh or done == steps:
        losses = np.asarray(totals.mean_loss())
        bar.update(done - shown)
        shown = done
        bar.set_postfix(loss=f'{float(np.mean(losses)):.4f}', acc=f'{float(np.mean(totals.accuracy())):.4f}')
        if not np.isfinite(losses).any():
          break
    bar.close()
    train_loss, train_accuracy = np.asarray(totals.mean_loss()), np.asarray(totals.accuracy())
    train_seconds = time.perf_counter() - timer
    for lane in range(k):
      if diverged[lane] is None and not math.isfinite(float(train_loss[lane])):
        diverged[lane] = epoch + 1
        if lane >= len(program.runs):
          continue  # a padding lane
        log(f'{_lane_name(program, lane)}diverged in epoch {epoch + 1}: training loss is {float(train_loss[lane])} '
            '(try a smaller --learning_rate)')
    if all(d is not None for d in diverged[: len(program.runs)]):
      break
    if config.precise_bn:
      precise_state = program.precise(state, batches[..., : plan.precise_steps(config), :])
      val = program.evaluate(precise_state, 'val', 'moving')
    else:
      val = program.evaluate(state, 'val', config.eval_stats)
    val_loss, val_accuracy = np.asarray(val.mean_loss()), np.asarray(val.accuracy())
    eval_seconds = time.perf_counter() - timer - train_seconds
    for lane in range(k):
      if diverged[lane] is not None:
        continue
      metrics = {
          'epoch': epoch + 1, 'step': epoch * plan.steps_per_epoch + steps,
          'train_loss': float(train_loss[lane]), 'train_accuracy': float(train_accuracy[lane]),
          'val_loss': float(val_loss[lane]), 'val_accuracy': float(val_accuracy[lane]),
          'seconds': train_seconds, 'examples_per_second': steps * batch_size * k / train_seconds,
          'eval_seconds': eval_seconds,
      }
      histories[lane].append(metrics)
      if sinks and lane < len(sinks):
        sinks[lane](metrics)
    if k == 1:
      m = histories[0][-1]
      log(f'epoch {epoch + 1:3d}/{plan.num_epochs}  train loss {m["train_loss"]:.4f} acc {m["train_accuracy"]:.4f}  '
          f'val loss {m["val_loss"]:.4f} acc {m["val_accuracy"]:.4f}  '
          f'{train_seconds:.1f}s ({m["examples_per_second"]:,.0f} ex/s)')
    last = epoch + 1 == plan.num_epochs
    if checkpoint is not None and checkpoint_every and ((epoch + 1) % checkpoint_every == 0 or last):
      checkpoint(epoch + 1, state, histories)
    if interrupt_after_epoch is not None and epoch + 1 == interrupt_after_epoch and not last:
      raise Interrupted(f'interrupted after epoch {epoch + 1} (fault injection)')
  program.state = state
  return Result(state, histories, diverged, compile_seconds, precise_state)


def precise_examples(plan, config) -> int:
  """The training examples precise BN estimates its statistics from: `--precise_bn`, at most an epoch's."""
  return plan.precise_steps(config) * config.batch_size


def _lane_name(program, lane: int) -> str:
  if program.num_lanes == 1:
    return ''
  from bnjax.lab import config as config_lib

  return f'run {config_lib.run_id(program.configs[lane])} '


def summarize(program, result: Result) -> list[dict[str, Any]]:
  """One summary per lane: status, final/best validation accuracy, test accuracy with moving and with
  batch statistics, their gap, the variance shift, the history, times."""
  moving_statistics = program.has_moving_statistics
  live = [d is None for d in result.diverged_epoch]
  settings = program.configs[0]  # (lanes share their settings)
  tests = variance = None
  if any(live):
    # Without moving statistics a test with batch statistics is the same pass again: it runs only with them.
    batch_asked = settings.test_batch_stats or any(c.eval_stats == 'batch' for c in program.runs)
    kinds = ('moving', 'batch') if moving_statistics and batch_asked else ('moving',)
    tests = {stats: program.evaluate(result.state, 'test', stats) for stats in kinds}
    if result.precise_state is not None:
      tests['precise'] = program.evaluate(result.precise_state, 'test', 'moving')
    variance = program.variance_shift(result.state) if settings.variance_probes else None
  summaries = []
  for lane, config in enumerate(program.runs):
    history = result.histories[lane]
    summary: dict[str, Any] = {
        'epochs_completed': len(history), 'steps': history[-1]['step'] if history else 0,
        'step_loop': program.step_loop, 'diverged_epoch': result.diverged_epoch[lane],
        'compile_seconds': result.compile_seconds,
    }
    if not live[lane]:
      summary.update(status=STATUS_DIVERGED,
                     message=f'diverged in epoch {result.diverged_epoch[lane]}: training loss is not finite')
    else:
      moving = float(tests['moving'].accuracy()[lane])
      batch = float(tests['batch'].accuracy()[lane]) if 'batch' in tests else None
      chosen = tests['precise' if 'precise' in tests else 'batch' if config.eval_stats == 'batch' else 'moving']
      summary.update(
          status=STATUS_COMPLETED,
          test_accuracy=float(chosen.accuracy()[lane]), test_loss=float(chosen.mean_loss()[lane]),
          test_accuracy_moving_stats=moving,
          test_accuracy_batch_stats=batch,
          stats_gap=batch - moving if batch is not None else None,
      )
      if 'precise' in tests:
        summary['test_accuracy_precise_stats'] = float(tests['precise'].accuracy()[lane])
      if variance is not None:
        summary.update(diagnostics.shift_summary(jax.tree.map(lambda v: v[lane], variance)))
    if config.precise_bn:
      summary['precise_bn_examples'] = precise_examples(program.plan, config)
    if history:
      best = max(history, key=lambda m: m['val_accuracy'])
      summary.update(
          final_val_accuracy=history[-1]['val_accuracy'], best_val_accuracy=best['val_accuracy'],
          best_epoch=best['epoch'], final_train_accuracy=history[-1]['train_accuracy'],
          train_val_gap=history[-1]['train_accuracy'] - history[-1]['val_accuracy'],
          train_seconds=sum(m['seconds'] for m in history),
      )
    summaries.append(summary)
  return summaries
