"""The lab's structure: one option table that everything derives from, stable run identities, the core
apart from the lab, and a new norm kind that costs one table entry (trained through the CLIs)."""

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bnjax
from bnjax.lab import config as C
from bnjax.lab import corruption_table, models, options
from conftest import REPO

# The only modules of bnjax/ that import Flax: the package's lazy submodules (loaded on first use) but the lab.
FLAX_MODULES = tuple(name for name in bnjax._LAZY_SUBMODULES if name != 'lab')
CORE = sorted(p for p in (REPO / 'bnjax').glob('*.py') if p.stem not in FLAX_MODULES)


def _imports(path: Path) -> set[str]:
  tree = ast.parse(path.read_text())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


@pytest.mark.parametrize('path', CORE + [REPO / 'bnjax' / f'{name}.py' for name in FLAX_MODULES], ids=lambda p: p.name)
def test_no_core_module_imports_the_lab(path):
  imported = _imports(path)
  assert not [name for name in imported if name.startswith('bnjax.lab') or name == 'bnjax.lab'], imported
  if path.stem not in FLAX_MODULES:
    assert not [name for name in imported
                if name.startswith(('bnjax.linen', 'bnjax.nnx', 'flax', 'optax', 'orbax', 'torch'))], imported


def test_import_bnjax_loads_no_heavy_dependency():
  code = ('import sys, numpy as np, bnjax\n'
          'p, s = bnjax.batch_norm_init(3)\n'
          'y, s = bnjax.batch_norm(np.ones((4, 3), np.float32), p, s, training=True)\n'
          "heavy = [m for m in ('flax', 'optax', 'orbax', 'tensorflow_datasets', 'matplotlib', 'tensorboardX', 'torch')"
          ' if m in sys.modules]\n'
          'print(heavy)')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == '[]'


def test_config_fields_flags_and_hparams_derive_from_the_table():
  assert C.FIELDS == tuple(options.OPTIONS)
  assert {f.name: f.default for f in dataclasses.fields(C.TrainConfig)} == {
      n: o.default for n, o in options.OPTIONS.items()}
  assert set(models.HPARAMS) == {n for n, o in options.OPTIONS.items() if o.model_value}
  train_help = subprocess.run([sys.executable, str(REPO / 'experiments' / 'train.py'), '--helpfull'],
                              capture_output=True, text=True, timeout=120).stdout
  for option in options.OPTIONS.values():
    assert f'--{option.name}' in train_help or f'--[no]{option.name}' in train_help, option.name
    assert option.help.split()[0] in train_help


def test_the_data_sets_are_the_data_registry_s():
  from bnjax.lab.data import sources  # imports JAX, which the option table must not

  assert options.OPTIONS['dataset'].allowed() == tuple(sources.SPECS) + tuple(corruption_table.CLEAN)


def test_has_moving_statistics_comes_from_the_norm_kind():
  assert [k for k in options.NORM_KINDS if C.has_moving_statistics(C.TrainConfig(norm=k, virtual_batch_size=
                                                                                  None if k != 'ghost' else 50))] == [
      'bn', 'ghost', 'renorm']


def test_options_a_run_does_not_use_are_dropped_or_rejected():
  assert C.canonical(C.TrainConfig(norm='bn', rmax=2.0)) == C.TrainConfig(norm='bn')
  assert C.canonical(C.TrainConfig(momentum_schedule='inverse_decay', momentum=0.5)).momentum == 0.99
  with pytest.raises(ValueError, match=r'--rmax=2.0 .*--norm=renorm'):
    C.validate(C.TrainConfig(norm='bn', rmax=2.0))
  with pytest.raises(ValueError, match='--momentum=0.5 .*inverse_decay|--momentum=0.5 .*constant'):
    C.validate(C.TrainConfig(momentum_schedule='inverse_decay', momentum=0.5))


def test_values_vmap_and_structure_groups():
  bn = C.TrainConfig(norm='bn')
  assert C.vmapped_fields(bn) == ('momentum', 'learning_rate', 'seed')
  assert C.vmapped_fields(C.TrainConfig(norm='renorm', renorm_clipping='warmup')) == (
      'momentum', 'renorm_momentum', 'learning_rate', 'seed')
  assert C.group_key(bn) == C.group_key(dataclasses.replace(bn, momentum=0.5, seed=3, learning_rate=0.1))
  assert C.group_key(bn) != C.group_key(dataclasses.replace(bn, batch_size=32))


def test_run_ids_ignore_settings_and_defaults():
  assert C.run_id(C.TrainConfig()) == C.run_id(C.TrainConfig(workdir='x', progress_updates=3, data_dir='/d'))
  assert C.identity(C.TrainConfig(batch_size=32)) == {'batch_size': 32}


NEW_OPTION = '''
from bnjax.lab import options
options.OPTIONS['new_knob'] = options.Option('new_knob', float, 0.5, 'A new option with a default.', 'training')
from bnjax.lab import config, sweep
import json, sys
configs = [config.TrainConfig(**json.loads(line)) for line in sys.stdin]
assert 'new_knob' in config.FIELDS
done = sweep.finished_runs(sys.argv[1])
print(json.dumps([config.run_id(c) in done for c in configs]))
'''


def test_a_new_option_with_a_default_keeps_every_run_id(tmp_path):
  configs = [C.TrainConfig(), C.TrainConfig(norm='renorm', batch_size=32, rmax=2.0), C.TrainConfig(seed=3)]
  (tmp_path / 'runs').mkdir()
  for config in configs:
    (tmp_path / 'runs' / f'{C.run_id(config)}.json').write_text(json.dumps({'status': 'completed'}))
  lines = ''.join(json.dumps({k: v for k, v in c.to_dict().items()}) + '\n' for c in configs)
  result = subprocess.run([sys.executable, '-c', NEW_OPTION, str(tmp_path)], input=lines, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout) == [True, True, True]


def test_a_norm_kind_needs_declared_options():
  with pytest.raises(ValueError, match='not norm options'):
    options.register_norm_kind(options.NormKind('x', 'x', None, options=('batch_size',)))
  assert 'x' not in options.NORM_KINDS


TOY = REPO / 'tests' / 'scripts' / 'toy_norm_kind.py'


def _toy(script, *flags):
  return subprocess.run([sys.executable, str(TOY), script, *map(str, flags)], capture_output=True, text=True,
                        timeout=600, cwd=REPO)


def test_a_toy_norm_kind_trains_through_the_train_cli_and_a_two_lane_sweep(data_dir, tmp_path):
  common = [f'--data_dir={data_dir}', '--data_source=files', '--batch_size=100', '--norm=rms']
  single = _toy('train.py', *common, '--epochs=2', f'--workdir={tmp_path / "run"}', '--progress=false')
  assert single.returncode == 0, single.stderr[-3000:]
  summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
  assert summary['status'] == 'completed' and summary['test_accuracy'] > 0.5
  assert summary['test_accuracy_batch_stats'] is None  # no moving statistics: the kind says so
  swept = _toy('sweep.py', *common, '--epochs=1', '--seed=0,1', f'--sweep_dir={tmp_path / "sweep"}')
  assert swept.returncode == 0, swept.stderr[-3000:]
  assert '2 runs in 1 group(s)' in swept.stdout
  records = [json.loads(p.read_text()) for p in (tmp_path / 'sweep' / 'runs').glob('*.json')]
  assert sorted(r['config']['seed'] for r in records) == [0, 1]
  assert all(r['status'] == 'completed' and r['group_size'] == 2 for r in records)
