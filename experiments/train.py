r"""Train one model, or a named comparison of single runs (a study such as mnist_plain_vs_bn).

    python experiments/train.py --preset=mnist_plain_vs_bn      # the source's MNIST study (old name: seed000)
    python experiments/train.py --preset=cifar_cnn --epochs=5   # the CIFAR-10 CNN (old name: seed003), shorter
    python experiments/train.py --model=mnist_mlp --norm=renorm --batch_size=8 \
        --renorm_clipping=warmup --renorm_warmup_steps=500 --rmax_end_step=4000 --dmax_end_step=2500
    python experiments/train.py --norm=bn --update_stats=false --eval_stats=moving   # the classic bug
    python experiments/train.py --model=resnet20                # ResNet-20 with He et al.'s CIFAR-10 recipe
    python experiments/train.py --model=my_package.nets:build --norm=renorm   # your own Flax module

Every option of the table (`bnjax.lab.options`) is a flag of the same name
(`--helpfull` lists them with their help); flags given beside `--preset`
override it. `--model` is a registered model or the import path of your own
builder (`--model=my_package.nets:build`); the model's own training settings
are the defaults (`--model=resnet20` alone trains He et al.'s CIFAR-10
recipe), and every flag overrides them. Outputs go to `--workdir` (default: runs/<preset or model>-<time>);
a workdir that holds another run is refused (`--resume` continues it,
`--overwrite` replaces it). Errors end in one line (`--verbose`: traceback).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from absl import flags

from bnjax.lab import cli
from bnjax.lab import config as config_lib
from bnjax.lab import studies

FLAGS = flags.FLAGS
flags.DEFINE_string('preset', None, 'A comparison of single runs: ' + '; '.join(
    f'{s.name} (old name {", ".join(s.aliases)}): {s.description}' for s in studies.STUDIES.values()
    if s.name in ('mnist_plain_vs_bn', 'cifar_cnn')) + '. Flags given beside it override it.')
flags.DEFINE_bool('resume', False, 'Continue the run in --workdir from its latest checkpoint (same settings; '
                  '--epochs may grow with a constant learning rate).')
flags.DEFINE_bool('overwrite', False, 'Replace the run --workdir holds (its checkpoints, metrics and summary).')
flags.DEFINE_bool('progress', True, 'Show a progress bar per epoch.')
flags.DEFINE_integer('interrupt_after_epoch', None, "Fault injection: exit with status 3 after this epoch's checkpoint.")
cli.define_option_flags(lists=False)


def default_workdir(preset: str | None, settings: dict) -> str:
  model = settings.get('model', config_lib.DEFAULTS.model).replace(':', '.')  # an import path: a plain folder name
  name = preset or f'{model}-{settings.get("norm", "bn")}'
  return str(Path('runs') / f'{name}-{time.strftime("%Y%m%d-%H%M%S")}')


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments {argv[1:]}: every setting is a --flag (see --helpfull).')
  settings = cli.given_options(lists=False)
  if FLAGS.resume and 'workdir' not in settings:
    raise ValueError('--resume needs the --workdir of the run to continue.')
  if FLAGS.preset is not None:
    name = studies.ALIASES.get(FLAGS.preset, FLAGS.preset)
    if name not in studies.PRESET_VARIANTS:
      raise ValueError(f'--preset={FLAGS.preset!r} is invalid: expected mnist_plain_vs_bn (seed000) or cifar_cnn '
                       f'(seed003); the other studies run with experiments/study.py.')
    study = studies.get(name)
    root = Path(settings.pop('workdir', None) or default_workdir(FLAGS.preset, settings))
    base = studies.settings_for(study.name, 'cpu', settings)  # (--steps replaces the preset's --epochs)
    configs = {name: config_lib.make({**base, **fields, **settings})
               for name, fields in studies.PRESET_VARIANTS[study.name].items()}
  else:
    root = Path(settings.pop('workdir', None) or default_workdir(None, settings))
    configs = {'run': config_lib.make(config_lib.with_model_defaults(settings))}
  try:
    return train(configs, root)
  finally:
    from bnjax.lab import rundir

    rundir.unlock_all_folders()  # the workdirs' locks (train() takes them first); a folder left empty goes too


def train(configs: dict, root: Path) -> int:
  """Trains each config (a preset's variants into root/<variant>), prints the table; exit status."""
  from bnjax.lab import build, experiment, parallel, plots
  import jax

  first = next(iter(configs.values()))
  # Before any other JAX call: afterwards jax.devices() lists every process's devices.
  parallel.initialize(first.coordinator_address, first.num_processes, first.process_id, FLAGS.coordinator_timeout)
  main_process = parallel.is_main_process()
  if jax.process_count() > 1 and first.workdir is None and not FLAGS['workdir'].present:
    raise ValueError('a multi-process run needs --workdir: the same folder on every process (shared storage).')
  multiple = len(configs) > 1
  configs = {name: dataclasses.replace(c, workdir=str(root / name if multiple else root)) for name, c in configs.items()}
  # Every variant's folder is locked (until this process ends) and checked, and its model built, before anything
  # loads (a user's builder that raises: one line now, not after the data loads).
  for config in configs.values():
    experiment.check_workdir(config, resume=FLAGS.resume, overwrite=FLAGS.overwrite)
    build.model(config)
  dataset = build.dataset(first, put=jax.device_put if jax.process_count() == 1 else None)
  print(f'{first.dataset}: {dataset.train_images.shape[0]} train, {dataset.val_images.shape[0]} validation, '
        f'{dataset.test_images.shape[0]} test examples from {dataset.source}; on {jax.devices()[0].device_kind}')
  summaries, histories = {}, {}
  for name, config in configs.items():
    if multiple:
      print(f'--- {name}: norm={config.norm}')
    try:
      summaries[name] = experiment.run(
          config,
          dataset=dataset if config_lib.dataset_key(config) == config_lib.dataset_key(first) else None,
          resume=FLAGS.resume, overwrite=FLAGS.overwrite, interrupt_after_epoch=FLAGS.interrupt_after_epoch,
          progress=FLAGS.progress and main_process, log=print if main_process else lambda message: None,
      )
    except experiment.Interrupted as error:
      print(error)
      return 3
    histories[name] = experiment.read_history(config)
  ok = all(s['status'] == experiment.STATUS_COMPLETED for s in summaries.values())
  if not main_process:
    return 0 if ok else 1
  print()
  print(f'{"run":10s} {"status":10s} {"test acc":>9s} {"best val":>9s} {"train s":>8s}   workdir')
  for name, summary in summaries.items():
    figure = lambda key: '-' if summary.get(key) is None else f'{summary[key]:.4f}'
    print(f'{name:10s} {summary["status"]:10s} {figure("test_accuracy"):>9s} {figure("best_val_accuracy"):>9s} '
          f'{summary.get("train_seconds", 0.0):8.1f}   {configs[name].workdir}')
  if multiple:
    plots.plot_curves(histories, root / 'curves.png', title=f'{FLAGS.preset}: {", ".join(configs)}')
    print(f'histories plotted together in {root / "curves.png"}')
  return 0 if ok else 1


if __name__ == '__main__':
  cli.run(main, on_stop='the last completed checkpoint is kept: the same command with '
          '--resume continues the run.')
