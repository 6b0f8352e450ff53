r"""Train one model: every option of the table (`bnjax.lab.options`) is a flag of the same name.

    python experiments/train.py --model=mnist_mlp --norm=renorm --batch_size=8 \
        --renorm_clipping=warmup --renorm_warmup_steps=500 --rmax_end_step=4000 --dmax_end_step=2500
    python experiments/train.py --norm=bn --update_stats=false --eval_stats=moving   # the classic bug
    python experiments/train.py --model=resnet20                # ResNet-20 with He et al.'s CIFAR-10 recipe
    python experiments/train.py --model=my_package.nets:build --norm=renorm   # your own Flax module

`--helpfull` lists the flags with their help. `--model` is a registered model
or the import path of your own builder (`--model=my_package.nets:build`); the
model's own training settings are the defaults (`--model=resnet20` alone
trains He et al.'s CIFAR-10 recipe), and every flag overrides them. Outputs
go to `--workdir` (default: runs/<model>-<norm>-<time>); a workdir that holds
another run is refused (`--resume` continues it, `--overwrite` replaces it).
Errors end in one line (`--verbose`: traceback). Named studies (several runs,
a table, plots) run with experiments/study.py (`./launch.sh list`).
"""

from __future__ import annotations

from absl import flags

from bnjax.lab import cli, entry

FLAGS = flags.FLAGS
flags.DEFINE_bool('resume', False, 'Continue the run in --workdir from its latest checkpoint (same settings; '
                  '--epochs may grow with a constant learning rate).')
flags.DEFINE_bool('overwrite', False, 'Replace the run --workdir holds (its checkpoints, metrics and summary).')
flags.DEFINE_bool('progress', True, 'Show a progress bar per epoch.')
flags.DEFINE_integer('interrupt_after_epoch', None, "Fault injection: exit with status 3 after this epoch's checkpoint.")
cli.define_option_flags(lists=False)


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments {argv[1:]}: every setting is a --flag (see --helpfull).')
  return entry.train(cli.given_options(lists=False), resume=FLAGS.resume, overwrite=FLAGS.overwrite,
                     progress=FLAGS.progress, interrupt_after_epoch=FLAGS.interrupt_after_epoch,
                     coordinator_timeout=FLAGS.coordinator_timeout)


if __name__ == '__main__':
  cli.run(main, on_stop='the last completed checkpoint is kept: the same command with '
          '--resume continues the run.')
