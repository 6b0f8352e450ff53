"""What several study files share: the source's recipes, a sweep that must not fail, table cells, and the
configs of BN and batch renorm over ghost batches.

    configs = [ghost_bn(base, 4, seed=0), ghost_renorm(base, 4, seed=0)]   # statistics over 4 examples
    records = sweep_records(configs, out / 'sweep', log)                    # resumable; raises if a run failed
    cell([0.9781, 0.9790, 0.9770])                                          # '0.9780 ± 0.0010 (3)'
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from bnjax.lab import config as config_lib
from bnjax.lab import report as report_lib
from bnjax.lab.config import TrainConfig

# The source's MNIST recipe: the MLP with Adam 1e-3, the test set as validation.
MNIST = dict(dataset='mnist', model='mnist_mlp', optimizer='adam', learning_rate=1e-3, validation='test')
# The source's CIFAR-10 study: the CNN with BN, Adam 1e-4, batch 32, 30% of train held out (seed 777).
CIFAR = dict(dataset='cifar10', model='cifar_cnn', norm='bn', optimizer='adam', learning_rate=1e-4, epochs=30,
             batch_size=32, validation='0.3', validation_seed=777, scaling='standardize')
# The BN momenta the momentum studies compare (each also with the inverse-decay schedule).
MOMENTA = [0.6, 0.75, 0.85, 0.9, 0.99]


def sweep_records(configs: Sequence[TrainConfig], folder: Path, log) -> list[dict]:
  """`sweep.run_sweep` (resumable, vmapped groups) in `folder`, records in the configs' order; raises if a run
  failed (a study's table needs every run)."""
  from bnjax.lab import sweep

  records = sweep.run_sweep(configs, folder, command='bnjax.lab.studies', report=False, log=log)
  failed = [r for r in records if r['status'] == sweep.STATUS_ERROR]
  if failed:
    raise RuntimeError(f'{len(failed)} run(s) failed, e.g. {failed[0].get("error")}')
  return records


def matching(records: Sequence[dict], **fields) -> list[dict]:
  """The records whose config has each of `fields`."""
  return [r for r in records if all(r['config'][k] == v for k, v in fields.items())]


def cell(values: Sequence[float | None], digits: int = 4) -> str:
  """'0.9781 ± 0.0012 (3)' for a table (one run: '0.9781'); '-' when there is no finite value."""
  mean, std, n = report_lib.mean_std(values)
  if n == 0:
    return '-'
  if n == 1:
    return f'{mean:.{digits}f}'
  return f'{mean:.{digits}f} ± {std:.{digits}f} ({n})'


def renorm_warmup_scaled(config: TrainConfig) -> TrainConfig:
  """The Batch Renorm paper's clipping schedule (plain BN for 5k steps, rmax at 40k, dmax at 25k of
  its 40k+), scaled to this run's length: 1/8, 1 and 5/8 of the run."""
  if config.norm != 'renorm' or config.steps is None:
    return config
  return dataclasses.replace(config, renorm_clipping='warmup', renorm_warmup_steps=config.steps // 8,
                             rmax_end_step=config.steps, dmax_end_step=config.steps * 5 // 8)


def in_steps(config: TrainConfig, epochs: int) -> TrainConfig:
  """`config` trained for `epochs` epochs, said in steps (so that renorm's clipping warm-up can be scaled to
  the run: `renorm_warmup_scaled`)."""
  from bnjax.lab import build

  steps = epochs * build.steps_per_epoch(config, build.dataset(config).train_images.shape[0])
  return dataclasses.replace(config, steps=steps, epochs=config_lib.DEFAULTS.epochs)


def ghost_bn(base: TrainConfig, ghost: int, **fields) -> TrainConfig:
  """BN with statistics over ghost batches of `ghost` examples (plain BN when that is the whole batch)."""
  norm = dict(norm='bn') if ghost == base.batch_size else dict(norm='ghost', virtual_batch_size=ghost)
  return dataclasses.replace(base, **norm, **fields)


def ghost_renorm(base: TrainConfig, ghost: int, **fields) -> TrainConfig:
  """Batch renorm over ghost batches of `ghost` examples, with the paper's warm-up scaled to the run."""
  return renorm_warmup_scaled(dataclasses.replace(base, norm='renorm', virtual_batch_size=ghost, **fields))


def check_ghost_sizes(ghost_sizes: Sequence[int], batch_size: int) -> None:
  """A study's `--ghost_sizes` must each be a divisor of its `--batch_size` of at least 2: one line naming them."""
  bad = [g for g in ghost_sizes if g < 2 or batch_size % g]
  if bad:
    raise ValueError(f'--ghost_sizes={",".join(map(str, ghost_sizes))} is invalid: {", ".join(map(str, bad))} '
                     f'{"is" if len(bad) == 1 else "are"} not a divisor of --batch_size={batch_size} of at least 2 '
                     '(each ghost batch takes that many examples of a batch).')
