"""bnjax/__init__.py: the functional core imports eagerly, every other module on first access."""

from pathlib import Path

import bnjax

EAGER = {'layers', 'torch_interop', 'moments', 'normalize', 'norm', 'precise', 'schedules'}


def test_every_module_is_reachable_from_the_package():
  package = Path(bnjax.__file__).parent
  modules = {p.stem for p in package.glob('*.py') if p.stem != '__init__'} | {
      p.name for p in package.iterdir() if (p / '__init__.py').is_file()
  }
  assert modules - EAGER == set(bnjax._LAZY_SUBMODULES)
  for name in bnjax._LAZY_SUBMODULES:
    assert getattr(bnjax, name).__name__ == f'bnjax.{name}'


def test_core_api_names():
  for name in ('batch_norm', 'batch_norm_init', 'batch_renorm', 'batch_renorm_init', 'BatchNormState',
               'BatchRenormState', 'inverse_decay_momentum', 'renorm_clipping_warmup', 'momentum_from_pytorch'):
    assert callable(getattr(bnjax, name))
