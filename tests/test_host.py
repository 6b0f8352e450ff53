"""bnjax.lab.host: the CLIs' host settings (allocator, CPU devices)."""

import json
import platform

import pytest

from bnjax.lab import config as config_lib
from bnjax.lab import experiment, host
from conftest import run_script
from fixtures import write_learnable_mnist


@pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_retain_freed_memory_takes_on_glibc():
  assert host.retain_freed_memory() is True
  assert host.apply('retain') is True
  assert host.apply('glibc') is False


def test_an_unknown_allocator_is_named():
  with pytest.raises(ValueError, match='--host_allocator=.bogus.'):
    host.apply('bogus')


def test_the_cli_flag_rejects_an_unknown_allocator_in_one_line():
  result = run_script('train.py', '--host_allocator=bogus')
  assert result.returncode == 2
  assert 'Traceback' not in result.stderr and '--host_allocator' in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


def test_cpu_devices_is_unset_auto_or_a_count():
  assert host.parse_cpu_devices(None) is None
  assert host.parse_cpu_devices('auto') == host.cpu_cores() >= 1
  assert host.parse_cpu_devices('3') == 3


@pytest.mark.parametrize('value', ['0', '-2', 'two'])
def test_a_bad_cpu_device_count_is_named(value):
  with pytest.raises(ValueError, match=f"--cpu_devices='{value}' is invalid"):
    host.parse_cpu_devices(value)


def _outputs(folder):
  return (json.loads((folder / 'summary.json').read_text()), json.loads((folder / 'config.json').read_text()),
          [json.loads(line) for line in (folder / 'metrics.jsonl').read_text().splitlines()])


def test_the_cli_trains_over_cpu_devices_as_on_one(tmp_path):
  """--cpu_devices=2: two CPU devices, data-parallel with synchronized BN: one device's numbers, up to rounding."""
  data_dir = write_learnable_mnist(tmp_path / 'data')
  settings = dict(data_dir=str(data_dir), data_source='files', steps=8, batch_size=96)
  result = run_script('train.py', *(f'--{k}={v}' for k, v in settings.items()), '--progress=false',
                      f'--workdir={tmp_path / "two"}', '--cpu_devices=2')
  assert result.returncode == 0, result.stdout + result.stderr
  # The reference on this process's one device.
  experiment.run(config_lib.validate(config_lib.TrainConfig(**settings, workdir=str(tmp_path / 'one'))),
                 progress=False, log=lambda message: None)
  one, one_config, one_history = _outputs(tmp_path / 'one')
  two, two_config, two_history = _outputs(tmp_path / 'two')
  assert one_config['environment']['num_devices'] == 1
  assert two_config['environment']['device_count'] == 2 and two_config['environment']['num_devices'] == 2
  for key in ('final_train_accuracy', 'test_accuracy', 'test_accuracy_batch_stats', 'best_val_accuracy'):
    assert abs(two[key] - one[key]) <= 0.01, (key, two[key], one[key])
  for epoch_one, epoch_two in zip(one_history, two_history, strict=True):
    assert epoch_two['train_loss'] == pytest.approx(epoch_one['train_loss'], rel=1e-3)
    assert epoch_two['val_loss'] == pytest.approx(epoch_one['val_loss'], rel=1e-3)


def test_the_cli_rejects_a_bad_cpu_device_count_in_one_line():
  result = run_script('train.py', '--cpu_devices=0')
  assert result.returncode == 2
  assert 'Traceback' not in result.stderr and "--cpu_devices='0' is invalid" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
