"""One training run, end to end: data -> model -> epochs -> metrics, plots, checkpoints.

    summary = bnjax.lab.experiment.run(config)

Outputs in `config.workdir` (when set; `bnjax.lab.rundir` says what each
file holds and the rules that keep two runs apart): `config.json`,
`metrics.jsonl` and TensorBoard events per epoch, `summary.json` (final and
best validation accuracy, test accuracy with the moving and with batch
statistics, the variance shift, times, status completed | diverged),
`curves.png`, `checkpoints/`. `resume=True` continues from the latest
checkpoint and ends with exactly the metrics of an uninterrupted run.

With several devices (`config.num_devices`, default every device of every
process) the steps run data-parallel (`bnjax.lab.engine.make_data_parallel_train_steps`). In a
multi-process run every process runs this same function; process 0 writes
the files above, and Orbax coordinates the checkpoints.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import optax

from bnjax.lab import build, loop, parallel, plots, programs, rundir


def environment() -> dict[str, Any]:
  """Versions and hardware, recorded beside every result."""
  device = jax.devices()[0]
  return {
      'jax': jax.__version__,
      'flax': flax.__version__,
      'optax': optax.__version__,
      'python': platform.python_version(),
      'platform': device.platform,
      'device_kind': device.device_kind,
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      'command': ' '.join(sys.argv),
  }


def check_workdir(config, *, resume: bool | str = False, overwrite: bool = False,
                  folder_flag: str | None = '--workdir') -> bool:
  """Fails before any data loads: devices, and a workdir that can't take the run. Returns whether to resume
  (`folder_flag`: how messages name the workdir; None: by its path, for runs a study places)."""
  workdir = Path(config.workdir) if config.workdir else None
  num_devices = parallel.resolve_num_devices(config.num_devices)
  if num_devices > 1:
    parallel.per_device_batch(config.batch_size, num_devices)
  if workdir is None:
    return False
  # One writer: the folder is locked before it is checked, and stays locked until the run ends (or the process).
  took = rundir.lock_folder(workdir, folder_flag) if parallel.is_main_process() else False
  try:
    if resume == 'auto':
      resume = (workdir / rundir.CHECKPOINTS).is_dir() and any((workdir / rundir.CHECKPOINTS).iterdir())
    return rundir.check_folder(workdir, config, resume=bool(resume), overwrite=overwrite, flag=folder_flag)
  except BaseException:
    if took:
      rundir.unlock_folder(workdir, discard=True)
    raise


def read_history(config) -> list[dict]:
  """The epochs' metrics a run wrote in its workdir."""
  return rundir.RunFolder(Path(config.workdir), config).history()


def run(
    config,
    *,
    dataset=None,
    resume: bool | str = False,
    overwrite: bool = False,
    interrupt_after_epoch: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    folder_flag: str | None = '--workdir',
) -> dict[str, Any]:
  """Trains one model as `config` says and returns its summary (also written to the workdir).

  Args:
    config: a validated `TrainConfig`.
    dataset: an already loaded `bnjax.lab.data.Dataset` with device arrays
      (e.g. shared by the runs of a study); loaded from the config when None.
    resume: continue the run in `config.workdir` from its latest checkpoint
      (True: it must have one; 'auto': if it has one, else start).
    overwrite: replace the run `config.workdir` holds.
    interrupt_after_epoch: fault injection: stop with `loop.Interrupted` right
      after that epoch's checkpoint (tests use it to check resuming).
    progress: show a tqdm progress bar per epoch.
    log: where the one-line messages go.
    folder_flag: how messages name the workdir (None: by its path).
  """
  start = time.perf_counter()
  settings = loop.Settings(log=log, progress=progress, progress_updates=config.progress_updates,
                           interrupt_after_epoch=interrupt_after_epoch)
  workdir = Path(config.workdir) if config.workdir else None
  locked_by_caller = workdir is not None and rundir.holds_lock(workdir)  # (train.py locks every variant first)
  resume = check_workdir(config, resume=resume, overwrite=overwrite, folder_flag=folder_flag)
  try:
    folder = rundir.RunFolder(workdir, config, writer=parallel.is_main_process() and workdir is not None)
    program, result, dataset = _train(config, settings, folder, dataset=dataset, resume=resume,
                                      folder_flag=folder_flag)
    summary = _summary(config, program, result, dataset)
    summary['total_seconds'] = time.perf_counter() - start
    folder.write_summary(summary)
    if folder.writer and result.histories[0]:
      plots.plot_curves({config.norm: result.histories[0]}, workdir / 'curves.png',
                        title=f'{config.model} on {config.dataset}')
    return summary
  finally:
    if workdir is not None and not locked_by_caller:
      rundir.unlock_folder(workdir, discard=True)


def _train(config, settings: loop.Settings, folder: rundir.RunFolder, *, dataset, resume: bool, folder_flag):
  """`(program, loop.Result, dataset)`: the run trained in its locked, checked workdir (resumed if asked)."""
  num_devices = parallel.resolve_num_devices(config.num_devices)
  if dataset is None:
    dataset = build.dataset(config, put=jax.device_put if num_devices == 1 else None)
  program = programs.single(config, dataset)
  workdir = folder.path
  checkpoints = rundir.Checkpoints(workdir / rundir.CHECKPOINTS) if workdir and config.checkpoint_every else None
  start_epoch, histories = checkpoints.resume(program, settings.log) if resume and checkpoints else (0, None)
  history = histories[0] if histories else []
  if history:
    rundir.check_resumed_length(workdir, history[-1]['step'], program.plan, folder_flag)
  folder.write_config(dict(environment(), num_devices=num_devices))
  folder.start_metrics(history)
  outputs = loop.Outputs(sinks=[folder.add_epoch], checkpoint=checkpoints.save if checkpoints else None,
                         checkpoint_every=config.checkpoint_every)
  try:
    result = loop.train(program, settings, outputs, start_epoch=start_epoch, histories=[history])
  finally:
    folder.close()
    if checkpoints is not None:
      checkpoints.close()
  return program, result, dataset


def _summary(config, program, result: loop.Result, dataset) -> dict[str, Any]:
  """The run's summary (`loop.summarize`), with the test-time adaptation methods `--adapt` asks for."""
  evaluation_start = time.perf_counter()
  (summary,) = loop.summarize(program, result)
  summary['final_eval_seconds'] = time.perf_counter() - evaluation_start  # the end-of-run tests and probes
  if summary['status'] == loop.STATUS_DIVERGED:
    summary['message'] += ' (try a smaller --learning_rate)'
  elif config.adapt != 'source':
    from bnjax.lab import adaptation  # test-time adaptation on the test split (--adapt)

    trained = result.precise_state if result.precise_state is not None else result.state
    summary.update(adaptation.summary_entries(adaptation.evaluate_methods(
        config, build.model(config), trained, dataset.test_images, dataset.test_labels)))
  return summary
