"""docs/results.md section 3: Ioffe & Szegedy 2015, Figure 1: test accuracy and a sigmoid's input over training
of a 3 x 100 sigmoid MLP, with and without BN."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from bnjax.lab import config as config_lib
from bnjax.lab.config import TrainConfig
from bnjax.lab.report import markdown_table
from bnjax.lab.study import Study


def figure1_config(norm: str, settings: Mapping, data_dir: str | None) -> TrainConfig:
  """The paper's MLP (`mlp_bn_paper`, sigmoid) with SGD, `norm` 'none' or 'bn'."""
  return config_lib.validate(TrainConfig(
      dataset='mnist', model='mlp_bn_paper', activation='sigmoid', norm=norm, optimizer='sgd',
      learning_rate=settings['learning_rate'], batch_size=settings['batch_size'], steps=settings['steps'],
      seed=settings['seed'], data_dir=data_dir, validation='test', scaling='unit'))


def train_tracked(config: TrainConfig, dataset, every: int, log) -> dict:
  """Trains `config` for its steps; every `every` steps (and at step 0) measures the test accuracy and
  the 15/50/85th percentiles of the last block's unit-0 activation input on the test set, at inference
  (`percentiles`) and with the test set's own batch statistics (`percentiles_batch_stats`).

  Returns `{'step': [T], 'test_accuracy': [T], 'percentiles': [T, 3], 'percentiles_batch_stats': [T, 3]}` (lists).
  """
  import jax

  from bnjax.lab import build, diagnostics, engine, loop, programs

  program = programs.single(config, dataset)
  model = build.model(config)
  evaluate = engine.make_evaluate(model, batch_size=config.eval_batch_size)

  @jax.jit
  def measure(state):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    accuracy = evaluate(state, dataset.test_images, dataset.test_labels).accuracy()
    return (accuracy, diagnostics.activation_percentiles(model, variables, dataset.test_images),
            diagnostics.activation_percentiles(model, variables, dataset.test_images, train=True,
                                               rng=jax.random.PRNGKey(0)))

  track = {'step': [], 'test_accuracy': [], 'percentiles': [], 'percentiles_batch_stats': []}

  def record(step, state):
    accuracy, percentiles, batch_percentiles = jax.device_get(measure(state))
    track['step'].append(step)
    track['test_accuracy'].append(float(accuracy))
    track['percentiles'].append([float(p) for p in percentiles])
    track['percentiles_batch_stats'].append([float(p) for p in batch_percentiles])
    if len(track['step']) % 20 == 1 or step == program.plan.total_steps:
      log(f'{config.norm}: step {step}/{program.plan.total_steps}  test accuracy {track["test_accuracy"][-1]:.4f}')

  loop.train(program, loop.Settings(every_steps=(every, record), progress=False, log=lambda message: None))
  return track


def run(out: Path, settings: Mapping, data_dir: str | None, log) -> dict:
  import jax

  from bnjax.lab import build, plots

  tracks = {}
  dataset = None
  for norm in ('none', 'bn'):
    config = figure1_config(norm, settings, data_dir)
    path = out / f'track_{norm}.json'
    cached = json.loads(path.read_text()) if path.exists() else {}
    if cached.get('config') == config.to_dict():
      tracks[norm] = cached['track']
      continue
    dataset = dataset or build.dataset(config, put=jax.device_put)
    tracks[norm] = train_tracked(config, dataset, settings['every'], log)
    path.write_text(json.dumps({'config': config.to_dict(), 'track': tracks[norm]}))
  marks = [s for s in (1000, 2000, 5000, 10000, 20000, 50000) if s <= settings['steps']]
  if settings['steps'] not in marks:
    marks.append(settings['steps'])
  rows = []
  for mark in marks:
    row = [mark]
    for norm in ('none', 'bn'):
      track = tracks[norm]
      index = min(range(len(track['step'])), key=lambda i: abs(track['step'][i] - mark))
      row.append(f'{track["test_accuracy"][index]:.4f}')
    rows.append(row)
  spread = {norm: [p[2] - p[0] for p in tracks[norm]['percentiles']] for norm in tracks}
  drift = {norm: [p[1] for p in tracks[norm]['percentiles']] for norm in tracks}
  stats_rows = [[label, f'{np.ptp(drift[n]):.3f}', f'{min(spread[n]):.3f} .. {max(spread[n]):.3f}']
                for label, n in (('without BN', 'none'), ('with BN', 'bn'))]
  table = (markdown_table(['step', 'test accuracy without BN', 'test accuracy with BN'], rows) + '\n\n' +
           markdown_table(['last-layer sigmoid input (unit 0, test set)', 'range of the median over training',
                           '85th - 15th percentile over training'], stats_rows))
  plots.plot_figure1(tracks, out / 'fig1.png')
  return {'table': table, 'results': {'tracks': tracks}}


STUDY = Study('repro_fig1', 'Ioffe & Szegedy 2015, Figure 1: 3 x 100 sigmoid MLP, batch 60, with and without BN.',
              run, {'cpu': dict(steps=50_000, every=500, batch_size=60, learning_rate=0.1, seed=0),
                    'full': dict(steps=50_000, every=250, batch_size=60, learning_rate=0.1, seed=0)})
