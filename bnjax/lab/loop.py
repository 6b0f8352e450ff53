"""The training loop: the one epoch loop and the one summary builder, for every run, sweep group and study.

    program = programs.single(config, dataset)        # or programs.lanes(configs, dataset)
    result = loop.train(program, loop.Settings(progress=False), loop.Outputs(sinks=..., checkpoint=...))
    summaries = loop.summarize(program, result)       # one summary per lane

The loop sees K lanes (K = 1 for a single run). Each epoch goes through the
same phases, each one function:

- `train_epoch`: the epoch's batches through the compiled chunks of steps,
  refreshing the progress bar (and the `every_steps` hook);
- `find_divergence`: a lane whose training loss is not finite stops there;
- `evaluate`: validation (with precise BN: on the precise statistics);
- `record_epoch`: each lane's epoch metrics to its history and its sink
  (metrics.jsonl, TensorBoard: `bnjax.lab.rundir`);
- `checkpoint`: the whole state after each epoch it is asked to, so that a
  resumed run ends with exactly the numbers of an uninterrupted one.

How the loop runs and reports (`Settings`) and where its epochs go
(`Outputs`) are each one object, made once by the caller.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from bnjax.lab import diagnostics
from bnjax.lab import config as config_lib

STATUS_COMPLETED = 'completed'
STATUS_DIVERGED = 'diverged'


class Interrupted(RuntimeError):
  """Raised after the checkpoint of `interrupt_after_epoch` (fault injection for resume tests)."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """How the loop runs and reports, never what it computes (that is the program's configs).

  Attributes:
    log: where the one-line messages go.
    progress: show a progress bar per epoch.
    progress_updates: progress-bar refreshes (and divergence checks) per
      epoch; the steps of one compiled call are an epoch's divided by it
      (1: one call per epoch).
    interrupt_after_epoch: fault injection: raise `Interrupted` right after
      that epoch's checkpoint.
    every_steps: `(n, hook)`: `hook(step, state)` at step 0 and after every
      n steps (and the last): measurements during training (the BN paper's
      Figure 1). The steps then run n at a time; n must divide an epoch's
      steps (or the run be shorter than an epoch).
  """

  log: Callable[[str], None] = print
  progress: bool = True
  progress_updates: int = 10
  interrupt_after_epoch: int | None = None
  every_steps: tuple[int, Callable[[int, Any], None]] | None = None


@dataclasses.dataclass(frozen=True)
class Outputs:
  """Where a run's epochs go.

  Attributes:
    sinks: per lane, `metrics -> None`, called after each epoch of a lane
      that has not diverged.
    checkpoint: `(epoch, state, histories) -> None`, called after every
      `checkpoint_every`-th epoch and the last (0: never).
  """

  sinks: Sequence[Callable[[dict], None]] = ()
  checkpoint: Callable[[int, Any, list], None] | None = None
  checkpoint_every: int = 0


class Result(NamedTuple):
  """What training produced: the final state, per lane the epoch history and the diverged epoch (or None)."""

  state: Any
  histories: list[list[dict]]
  diverged_epoch: list[int | None]
  compile_seconds: float
  precise_state: Any = None  # with --precise_bn: the state with the last evaluation's precise statistics


def train(program, settings: Settings = Settings(), outputs: Outputs = Outputs(), *, start_epoch: int = 0,
          histories: Sequence[list[dict]] | None = None) -> Result:
  """Trains the program's lanes from `start_epoch` to the end of its plan.

  Args:
    program: a `bnjax.lab.programs.Program` (its `state` is the start state).
    settings, outputs: how the loop runs, where its epochs go.
    start_epoch, histories: where a resumed run stands (epochs done, and each
      lane's metrics of those epochs).
  """
  plan, k = program.plan, program.num_lanes
  compile_seconds = _warm_up(program, chunk_steps(program, settings))
  _note_precise_cap(program, settings.log)
  result = Result(program.state, [list(h) for h in histories or [[] for _ in range(k)]], [None] * k, compile_seconds)
  if settings.every_steps is not None and start_epoch == 0:
    settings.every_steps[1](0, result.state)
  for epoch in range(start_epoch, plan.num_epochs):
    timer = time.perf_counter()
    batches = program.epoch_batches(result.state, epoch)[..., : _steps_of_epoch(plan, epoch), :]
    start = _statistics_at_freeze(program, result.state, epoch, batches)
    state, totals = train_epoch(program, start, epoch, batches, settings)
    train_seconds = time.perf_counter() - timer
    diverged = find_divergence(program, result.diverged_epoch, totals, epoch, settings.log)
    result = result._replace(state=state, diverged_epoch=diverged)
    if all(d is not None for d in result.diverged_epoch[: len(program.runs)]):
      break
    val, precise_state = evaluate(program, state, batches)
    seconds = (train_seconds, time.perf_counter() - timer - train_seconds)
    lanes = epoch_metrics(program, epoch, totals, val, seconds)
    result = result._replace(histories=record_epoch(program, result, lanes, outputs.sinks, settings.log),
                             precise_state=precise_state)
    checkpoint(program, epoch, result, outputs, settings)
  program.state = result.state
  return result


def chunk_steps(program, settings: Settings) -> int:
  """Steps per compiled call: an epoch's steps over `progress_updates`, 1 for the python step loop, or the
  `every_steps` interval."""
  plan = program.plan
  if settings.every_steps is not None:
    chunk = settings.every_steps[0]
    if plan.steps_per_epoch % chunk and plan.total_steps > plan.steps_per_epoch:
      raise ValueError(f'every_steps={chunk} does not divide the {plan.steps_per_epoch} steps of an epoch.')
    return chunk
  return 1 if program.step_loop == 'python' else _refresh_steps(plan, settings)


def _refresh_steps(plan, settings: Settings) -> int:
  """Steps between two reads of the metrics by the host (progress bar, divergence)."""
  return max(1, math.ceil(plan.steps_per_epoch / max(settings.progress_updates, 1)))


def _steps_of_epoch(plan, epoch: int) -> int:
  return min(plan.steps_per_epoch, plan.total_steps - epoch * plan.steps_per_epoch)


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


def _note_precise_cap(program, log: Callable[[str], None]) -> None:
  config = program.runs[0]
  if config.precise_bn and precise_examples(program.plan, config) < config.precise_bn:
    log(f'--precise_bn={config.precise_bn} is capped at the {precise_examples(program.plan, config):,} examples of '
        'an epoch (recorded as precise_bn_examples in the summary)')


def precise_examples(plan, config) -> int:
  """The training examples precise BN estimates its statistics from: `--precise_bn`, at most an epoch's."""
  return plan.precise_steps(config) * config.batch_size


def _is_frozen(config, epoch: int) -> bool:
  return config.freeze_bn_after is not None and epoch >= config.freeze_bn_after


def _statistics_at_freeze(program, state, epoch: int, batches):
  """The state the epoch starts from: at the freeze point with `--precise_bn`, with the precise statistics.

  Wu & Johnson's FrozenBN: the frozen layers keep the population statistics of the weights at the freeze.
  """
  config = program.configs[0]
  if config.precise_bn and config.freeze_bn_after is not None and epoch == config.freeze_bn_after:
    return program.precise(state, batches[..., : program.plan.precise_steps(config), :])
  return state


def train_epoch(program, state, epoch: int, batches, settings: Settings):
  """The steps of one epoch on `batches` (`[K, S, B]` lanes, `[S, B]` single); returns `(state, Metrics [K])`.

  Stops early when every lane's loss is not finite.
  """
  plan, frozen = program.plan, _is_frozen(program.configs[0], epoch)
  chunk, refresh, steps = chunk_steps(program, settings), _refresh_steps(plan, settings), batches.shape[-2]
  bar = tqdm(total=steps, desc=f'epoch {epoch + 1}/{plan.num_epochs}', unit='step', leave=False,
             disable=not settings.progress, file=sys.stderr, dynamic_ncols=True)
  totals, shown = None, 0
  for begin in range(0, steps, chunk):
    part = batches[..., begin : begin + chunk, :]
    state, metrics = program.train_chunk(state, part, frozen)
    totals = metrics if totals is None else totals.add(metrics)
    done = begin + part.shape[-2]
    _every_steps(settings.every_steps, plan, epoch * plan.steps_per_epoch + done, state)
    if done - shown >= refresh or done == steps:
      losses = np.asarray(totals.mean_loss())
      bar.update(done - shown)
      shown = done
      bar.set_postfix(loss=f'{float(np.mean(losses)):.4f}', acc=f'{float(np.mean(totals.accuracy())):.4f}')
      if not np.isfinite(losses).any():
        break
  bar.close()
  return state, totals


def _every_steps(every_steps, plan, step: int, state) -> None:
  if every_steps is not None and (step % every_steps[0] == 0 or step == plan.total_steps):
    every_steps[1](step, state)


def find_divergence(program, diverged: list, totals, epoch: int, log: Callable[[str], None]) -> list:
  """`diverged` with `epoch + 1` for each lane whose training loss just became non-finite (logged)."""
  train_loss = np.asarray(totals.mean_loss())
  diverged = list(diverged)
  for lane in range(program.num_lanes):
    if diverged[lane] is None and not math.isfinite(float(train_loss[lane])):
      diverged[lane] = epoch + 1
      if lane < len(program.runs):  # (else a padding lane)
        log(f'{_lane_name(program, lane)}diverged in epoch {epoch + 1}: training loss is {float(train_loss[lane])} '
            '(try a smaller --learning_rate)')
  return diverged


def _lane_name(program, lane: int) -> str:
  return '' if program.num_lanes == 1 else f'run {config_lib.run_id(program.configs[lane])} '


def evaluate(program, state, batches):
  """`(validation Metrics [K], precise state or None)` after an epoch on `batches`.

  With `--precise_bn` the validation uses the population statistics of the epoch's first batches.
  """
  config = program.configs[0]
  if config.precise_bn:
    precise_state = program.precise(state, batches[..., : program.plan.precise_steps(config), :])
    return program.evaluate(precise_state, 'val', 'moving'), precise_state
  return program.evaluate(state, 'val', config.eval_stats), None


def epoch_metrics(program, epoch: int, train, val, seconds: tuple[float, float]) -> list[dict]:
  """Per lane, the epoch's line of metrics.jsonl from its training and validation `Metrics [K]` (`seconds`:
  training, evaluation)."""
  train_seconds, eval_seconds = seconds
  k, steps = program.num_lanes, _steps_of_epoch(program.plan, epoch)
  arrays = [np.asarray(a) for a in (train.mean_loss(), train.accuracy(), val.mean_loss(), val.accuracy())]
  return [{
      'epoch': epoch + 1, 'step': epoch * program.plan.steps_per_epoch + steps,
      'train_loss': float(arrays[0][lane]), 'train_accuracy': float(arrays[1][lane]),
      'val_loss': float(arrays[2][lane]), 'val_accuracy': float(arrays[3][lane]),
      'seconds': train_seconds, 'examples_per_second': steps * program.configs[0].batch_size * k / train_seconds,
      'eval_seconds': eval_seconds,
  } for lane in range(k)]


def record_epoch(program, result: Result, lanes: list[dict], sinks, log: Callable[[str], None]) -> list[list[dict]]:
  """The histories with the epoch's metrics of every live lane, each handed to its sink; a single run logs it."""
  histories = [list(h) for h in result.histories]
  for lane, metrics in enumerate(lanes):
    if result.diverged_epoch[lane] is not None:
      continue
    histories[lane].append(metrics)
    if lane < len(sinks):
      sinks[lane](metrics)
  if program.num_lanes == 1:
    m = histories[0][-1]
    log(f'epoch {m["epoch"]:3d}/{program.plan.num_epochs}  train loss {m["train_loss"]:.4f} '
        f'acc {m["train_accuracy"]:.4f}  val loss {m["val_loss"]:.4f} acc {m["val_accuracy"]:.4f}  '
        f'{m["seconds"]:.1f}s ({m["examples_per_second"]:,.0f} ex/s)')
  return histories


def checkpoint(program, epoch: int, result: Result, outputs: Outputs, settings: Settings) -> None:
  """Saves after every `checkpoint_every`-th epoch and the last; then the fault injection, if asked."""
  done = epoch + 1
  last = done == program.plan.num_epochs
  if outputs.checkpoint is not None and outputs.checkpoint_every and (done % outputs.checkpoint_every == 0 or last):
    outputs.checkpoint(done, result.state, result.histories)
  if settings.interrupt_after_epoch == done and not last:
    raise Interrupted(f'interrupted after epoch {done} (fault injection)')


def summarize(program, result: Result) -> list[dict[str, Any]]:
  """One summary per lane: status, final/best validation accuracy, test accuracy with moving and with
  batch statistics, their gap, the variance shift, the history, times."""
  tests, variance = _final_tests(program, result)
  summaries = []
  for lane, config in enumerate(program.runs):
    history = result.histories[lane]
    summary: dict[str, Any] = {
        'epochs_completed': len(history), 'steps': history[-1]['step'] if history else 0,
        'step_loop': program.step_loop, 'diverged_epoch': result.diverged_epoch[lane],
        'compile_seconds': result.compile_seconds,
    }
    if result.diverged_epoch[lane] is not None:
      summary.update(status=STATUS_DIVERGED,
                     message=f'diverged in epoch {result.diverged_epoch[lane]}: training loss is not finite')
    else:
      summary.update(_test_entries(tests, variance, lane, config))
    if config.precise_bn:
      summary['precise_bn_examples'] = precise_examples(program.plan, config)
    summary.update(_history_entries(history))
    summaries.append(summary)
  return summaries


def _final_tests(program, result: Result) -> tuple[dict | None, Any]:
  """`({stats: test Metrics [K]}, variance shift or None)` of the trained lanes; `(None, None)` if all diverged.

  Without moving statistics a test with batch statistics is the same pass again: it runs only with them.
  """
  if all(d is not None for d in result.diverged_epoch):
    return None, None
  settings = program.configs[0]  # (lanes share their settings)
  batch_asked = settings.test_batch_stats or any(c.eval_stats == 'batch' for c in program.runs)
  kinds = ('moving', 'batch') if program.has_moving_statistics and batch_asked else ('moving',)
  tests = {stats: program.evaluate(result.state, 'test', stats) for stats in kinds}
  if result.precise_state is not None:
    tests['precise'] = program.evaluate(result.precise_state, 'test', 'moving')
  return tests, program.variance_shift(result.state) if settings.variance_probes else None


def _test_entries(tests: dict, variance, lane: int, config) -> dict[str, Any]:
  """A completed lane's test accuracies (the headline: precise, batch or moving statistics) and variance shift."""
  moving = float(tests['moving'].accuracy()[lane])
  batch = float(tests['batch'].accuracy()[lane]) if 'batch' in tests else None
  chosen = tests['precise' if 'precise' in tests else 'batch' if config.eval_stats == 'batch' else 'moving']
  entries = dict(
      status=STATUS_COMPLETED,
      test_accuracy=float(chosen.accuracy()[lane]), test_loss=float(chosen.mean_loss()[lane]),
      test_accuracy_moving_stats=moving, test_accuracy_batch_stats=batch,
      stats_gap=batch - moving if batch is not None else None,
  )
  if 'precise' in tests:
    entries['test_accuracy_precise_stats'] = float(tests['precise'].accuracy()[lane])
  if variance is not None:
    entries.update(diagnostics.shift_summary(jax.tree.map(lambda v: v[lane], variance)))
  return entries


def _history_entries(history: list[dict]) -> dict[str, Any]:
  """Final and best validation accuracy, the train/val gap and the training time of a lane's epochs."""
  if not history:
    return {}
  best = max(history, key=lambda m: m['val_accuracy'])
  return dict(
      final_val_accuracy=history[-1]['val_accuracy'], best_val_accuracy=best['val_accuracy'],
      best_epoch=best['epoch'], final_train_accuracy=history[-1]['train_accuracy'],
      train_val_gap=history[-1]['train_accuracy'] - history[-1]['val_accuracy'],
      train_seconds=sum(m['seconds'] for m in history),
  )
