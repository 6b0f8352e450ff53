"""bnjax/__init__.py: the functional core imports eagerly, every other module on first access."""

from pathlib import Path

import pytest

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


def test_no_other_name_loads_a_module():
  """Only the lazy submodules load on access: a lab module is `bnjax.lab.<name>`, the Flax modules `bnjax.linen`."""
  lab = Path(bnjax.__file__).parent / 'lab'
  lab_modules = {p.stem for p in lab.glob('*.py') if p.stem != '__init__'} | {
      p.name for p in lab.iterdir() if (p / '__init__.py').is_file()
  }
  for name in sorted((lab_modules | {'flax'}) - set(vars(bnjax))):
    with pytest.raises(AttributeError, match=f"no attribute '{name}'.*linen, nnx, lab, adapt"):
      getattr(bnjax, name)
