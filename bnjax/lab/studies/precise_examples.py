"""How many examples precise BN needs: test accuracy against the examples its statistics come from, on the MNIST
MLP at batch 500 and the CIFAR-10 CNN, against the moving averages."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from bnjax.lab import config as config_lib
from bnjax.lab.report import markdown_table
from bnjax.lab.study import Study
from bnjax.lab.study_common import CIFAR, MNIST


def trained_program(config, dataset, log):
  """`(program, summary)`: `config` trained from scratch (no folder), its program holding the final state."""
  from bnjax.lab import loop, programs

  program = programs.single(config, dataset)
  result = loop.train(program, loop.Settings(progress=False, log=log))
  return program, loop.summarize(program, result)[0]


def precise_accuracy_curve(program, examples: Sequence[int]) -> dict[int, float]:
  """Test accuracy with precise statistics from the first N examples of a fixed permutation.

  The statistics come from whole training batches, so N is rounded up to a
  multiple of the batch size (at most the epoch's batches): the curve's keys
  are the examples actually used.
  """
  import jax

  config = program.configs[0]
  indices = program.epoch_batches(program.state, 0)  # [S, B]: a permutation of the training set
  curve = {}
  for n in examples:
    steps = min(indices.shape[0], -(-n // config.batch_size))
    if steps * config.batch_size not in curve:
      state = program.precise(program.state, indices[:steps])
      curve[steps * config.batch_size] = float(jax.device_get(program.evaluate(state, 'test', 'moving').accuracy()[0]))
  return curve


def run(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  import jax

  from bnjax.lab import build, plots

  models = {'MNIST MLP, batch 500': config_lib.make(dict(MNIST, scaling='unit', norm='bn', batch_size=500,
                                                         data_dir=data_dir, epochs=settings['mlp_epochs'],
                                                         seed=settings['seed']))}
  if settings['cnn_epochs']:
    models['CIFAR-10 CNN, batch 32'] = config_lib.make(dict(CIFAR, epochs=settings['cnn_epochs'], data_dir=data_dir,
                                                            seed=settings['seed']))
  curves, moving = {}, {}
  for label, config in models.items():
    program, summary = trained_program(config, build.dataset(config, put=jax.device_put), log)
    curves[label] = precise_accuracy_curve(program, settings['examples'])
    moving[label] = summary['test_accuracy_moving_stats']
  examples = sorted({n for curve in curves.values() for n in curve})
  rows = [[n] + [f'{curves[label][n]:.4f}' if n in curves[label] else '-' for label in models] for n in examples]
  rows.append(['moving averages (EMA)'] + [f'{moving[label]:.4f}' for label in models])
  table = markdown_table(['examples for precise BN (whole batches)'] + list(models), rows)
  plots.plot_precise_examples(curves, moving, out / 'precise_examples.png')
  return {'table': table, 'results': {'curves': {k: {str(n): a for n, a in v.items()} for k, v in curves.items()},
                                      'moving': moving}}


STUDY = Study('precise_examples', 'How many examples precise BN needs: test accuracy vs examples (10^2..6x10^4), '
              'MNIST MLP at batch 500 and CIFAR-10 CNN, against the moving averages.', run,
              {'cpu': dict(mlp_epochs=5, cnn_epochs=2, seed=0, examples=[100, 300, 1000, 3000, 10_000, 30_000, 60_000]),
               'full': dict(mlp_epochs=20, cnn_epochs=30, seed=0,
                            examples=[100, 300, 1000, 3000, 10_000, 30_000, 60_000])})
