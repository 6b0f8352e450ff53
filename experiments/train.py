r"""Train one model: the main job of bnjax.

    python experiments/train.py --preset=seed000                # the MNIST plain-vs-BN study
    python experiments/train.py --preset=seed003 --epochs=5     # the CIFAR-10 CNN, shorter
    python experiments/train.py --model=mlp_seed --norm=renorm --batch_size=8 \
        --renorm_clipping=warmup --renorm_warmup_steps=500 --rmax_end_step=4000 --dmax_end_step=2500
    python experiments/train.py --norm=bn --update_stats=false --eval_stats=moving   # the classic bug

Every field of `bnjax.lab.config.TrainConfig` is a flag of the same name
(`--helpfull` lists them with their help); flags given beside `--preset`
override it. Outputs go to `--workdir` (default: runs/<preset or model>-<time>).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import typing
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bnjax import config as config_lib  # noqa: E402

HELP = {
    'dataset': 'Data set.',
    'data_source': 'auto: local files when found (--data_dir, $BNJAX_DATA_DIR, well-known places), else TFDS.',
    'data_dir': 'Folder with the canonical files (e.g. ../shared/data), or TFDS data_dir.',
    'scaling': 'unit: pixels / 255; standardize: per-channel mean/std of the training split.',
    'validation': "'test': the test set is the validation set; a fraction (e.g. 0.3) holds out that part of train.",
    'validation_seed': 'Seed of the held-out split (the source: 777).',
    'augment': 'CIFAR-10 augmentation on device: random crop with 4-pixel padding, horizontal flip.',
    'model': 'Model name (bnjax.lab.models registry).',
    'norm': 'none | bn | renorm (batch renormalization) | ghost (ghost batch norm, needs --virtual_batch_size).',
    'activation': 'Activation of every block.',
    'norm_position': 'Norm before (Dense -> BN -> act) or after the activation (Dense -> act -> BN).',
    'center': 'Learn the BN shift beta (the source: can be off after the activation).',
    'scale': 'Learn the BN scale gamma (the source: can be off after the activation).',
    'dropout_placement': 'none | before_norm (dropout feeds BN: variance shift) | after_norm (every block) | end (after the last BN).',
    'dropout_rate': 'Dropout rate in [0, 1).',
    'momentum': 'BN momentum, weight of the old moving average (Keras/Flax; PyTorch 0.1 = 0.9 here).',
    'momentum_schedule': 'constant, or inverse_decay: 1 - decay_rate ** (step / decay_steps) (the source, large batches).',
    'momentum_decay_rate': 'Base of the inverse-decay momentum schedule.',
    'momentum_decay_steps': 'Steps over which 1 - momentum shrinks by decay_rate.',
    'momentum_max': 'Cap of the inverse-decay momentum (unset: none; it then reaches 1.0 and freezes).',
    'epsilon': 'BN epsilon added to the variance.',
    'debias': 'Zero-debias the BN moving averages (Adam-style correction of the initial value).',
    'renorm_momentum': 'Batch renorm: momentum of the mu/sigma used for r and d.',
    'rmax': 'Batch renorm: r is clipped to [1/rmax, rmax] (final value with --renorm_clipping=warmup).',
    'dmax': 'Batch renorm: d is clipped to [-dmax, dmax] (final value with --renorm_clipping=warmup).',
    'renorm_clipping': "constant, or warmup: the paper's rmax 1 -> rmax, dmax 0 -> dmax after a warm-up.",
    'renorm_warmup_steps': 'Batch renorm warm-up: steps of plain BN before relaxing rmax/dmax.',
    'rmax_end_step': 'Batch renorm warm-up: step at which rmax reaches --rmax.',
    'dmax_end_step': 'Batch renorm warm-up: step at which dmax reaches --dmax.',
    'virtual_batch_size': 'Ghost batch size: BN statistics per group of this many examples.',
    'update_stats': 'Keep the updated moving statistics (false: the classic bug, evaluation then fails).',
    'eval_stats': 'moving: evaluate with the moving statistics (correct); batch: with each test batch\'s own.',
    'optimizer': 'adam (adamw with --weight_decay) | sgd | momentum.',
    'learning_rate': 'Peak learning rate.',
    'optimizer_momentum': 'Momentum of --optimizer=momentum (not BN momentum).',
    'weight_decay': 'Decoupled weight decay.',
    'lr_schedule': 'constant | cosine (to 0) | step (x0.1 at 50% and 75% of training).',
    'lr_warmup_steps': 'Linear learning-rate warm-up steps.',
    'batch_size': 'Training batch size (the last partial batch of an epoch is dropped).',
    'epochs': 'Training epochs.',
    'steps': 'Training steps; overrides --epochs when set.',
    'eval_batch_size': 'Evaluation batch size (with --eval_stats=batch it sets the statistics\' batch).',
    'seed': 'Random seed: initialization, shuffling, dropout.',
    'workdir': 'Output folder (default: runs/<preset or model>-<time>).',
    'checkpoint_every': 'Checkpoint every this many epochs (0: never).',
    'progress_updates': 'Progress-bar refreshes (and divergence checks) per epoch.',
    'step_loop': ('scan: each epoch is a few jitted lax.scans of steps; python: one jitted step per call '
                  '(XLA:CPU runs convolutions inside a scan ~30x slower); auto: python for conv models on CPU.'),
    'num_devices': ('Data-parallel devices (unset: every device of every process; 1: one device). '
                    '--batch_size is the global batch and must be a multiple of it.'),
    'cross_device_stats': ('With several devices: sync: BN statistics of the whole global batch; local: each device '
                           'normalizes its own shard (ghost BN with the per-device batch; moving statistics pooled).'),
    'coordinator_address': ('Multi-process: host:port of process 0 (else $JAX_COORDINATOR_ADDRESS); auto: let JAX '
                            'detect the cluster (Cloud TPU pod slice, SLURM, Open MPI).'),
    'num_processes': 'Multi-process: number of processes (else $JAX_NUM_PROCESSES).',
    'process_id': 'Multi-process: this process\'s id in [0, num_processes) (else $JAX_PROCESS_ID).',
}

FLAGS = flags.FLAGS
flags.DEFINE_string('preset', None, f'A study preset: {", ".join(config_lib.PRESETS)}. Flags given beside it override it.')
flags.DEFINE_bool('resume', False, 'Continue from the latest checkpoint in --workdir.')
flags.DEFINE_bool('progress', True, 'Show a progress bar per epoch.')
flags.DEFINE_integer('interrupt_after_epoch', None, 'Fault injection: exit with status 3 after this epoch\'s checkpoint.')


def _define_config_flags() -> None:
  """One flag per TrainConfig field, typed after the field, defaulting to 'unset' (None)."""
  hints = typing.get_type_hints(config_lib.TrainConfig)
  for field in dataclasses.fields(config_lib.TrainConfig):
    kind = hints[field.name]
    help_text = f'{HELP[field.name]} (default: {field.default!r})'
    choices = config_lib.CHOICES.get(field.name)
    if choices:
      flags.DEFINE_enum(field.name, None, choices, help_text)
    elif kind is bool:
      flags.DEFINE_bool(field.name, None, help_text)
    elif kind in (int, int | None):
      flags.DEFINE_integer(field.name, None, help_text)
    elif kind in (float, float | None):
      flags.DEFINE_float(field.name, None, help_text)
    else:
      flags.DEFINE_string(field.name, None, help_text)


_define_config_flags()


def explicit_settings() -> dict:
  """The TrainConfig fields given on the command line."""
  return {name: FLAGS[name].value for name in config_lib.FIELDS if FLAGS[name].present}


def default_workdir(preset: str | None, settings: dict) -> str:
  name = preset or f'{settings.get("model", "mlp_seed")}-{settings.get("norm", "bn")}'
  return str(Path('runs') / f'{name}-{time.strftime("%Y%m%d-%H%M%S")}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  settings = explicit_settings()
  try:
    configs = config_lib.resolve(FLAGS.preset, settings)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  if FLAGS.resume and 'workdir' not in settings:
    raise app.UsageError('--resume needs the --workdir of the run to continue.')
  first = next(iter(configs.values()))

  # Heavy imports after the flags are checked: a bad flag fails in a second.
  from bnjax.lab import build, experiment, parallel, plots
  import jax

  # Before any other JAX call: afterwards jax.devices() lists every process's devices.
  try:
    parallel.initialize(first.coordinator_address, first.num_processes, first.process_id)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  main_process = parallel.is_main_process()
  if jax.process_count() > 1 and 'workdir' not in settings:
    raise app.UsageError('a multi-process run needs --workdir: the same folder on every process (shared storage).')

  root = Path(settings.get('workdir') or default_workdir(FLAGS.preset, settings))
  multiple = len(configs) > 1
  dataset = build.dataset(first, put=jax.device_put if jax.process_count() == 1 else None)
  print(f'{first.dataset}: {dataset.train_images.shape[0]} train, {dataset.val_images.shape[0]} validation, '
        f'{dataset.test_images.shape[0]} test examples from {dataset.source}; on {jax.devices()[0].device_kind}')
  summaries, histories = {}, {}
  for name, config in configs.items():
    workdir = root / name if multiple else root
    config = dataclasses.replace(config, workdir=str(workdir))
    if multiple:
      print(f'--- {name}: norm={config.norm}')
    try:
      summary = experiment.run(
          config,
          dataset=dataset if build.dataset_key(config) == build.dataset_key(first) else None,
          resume=FLAGS.resume,
          interrupt_after_epoch=FLAGS.interrupt_after_epoch,
          progress=FLAGS.progress and main_process,
          log=print if main_process else lambda message: None,
      )
    except experiment.Interrupted as error:
      print(error)
      return 3
    summaries[name] = summary
    if main_process:
      histories[name] = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  if not main_process:
    return 0 if all(s['status'] == experiment.STATUS_COMPLETED for s in summaries.values()) else 1
  print()
  print(f'{"run":10s} {"status":10s} {"test acc":>9s} {"best val":>9s} {"train s":>8s}   workdir')
  for name, summary in summaries.items():
    figure = lambda key: '-' if summary.get(key) is None else f'{summary[key]:.4f}'
    print(f'{name:10s} {summary["status"]:10s} {figure("test_accuracy"):>9s} {figure("best_val_accuracy"):>9s} '
          f'{summary.get("train_seconds", 0.0):8.1f}   {root / name if multiple else root}')
  if multiple:
    plots.plot_curves(histories, root / 'curves.png', title=f'{FLAGS.preset}: {", ".join(configs)}')
    print(f'histories plotted together in {root / "curves.png"}')
  return 0 if all(s['status'] == experiment.STATUS_COMPLETED for s in summaries.values()) else 1


if __name__ == '__main__':
  app.run(main)
