"""Data-parallel training (`bnjax.lab.engine`'s step over `bnjax.lab.parallel`'s meshes) equals one device
(8 forced CPU devices, in subprocesses).

XLA_FLAGS must be set before jax is imported, so the multi-device runs are
scripts in tests/scripts run as subprocesses, each bounded by a timeout.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnjax.lab import config as config_lib
from conftest import REPO
from fixtures import write_learnable_mnist

SCRIPTS = Path(__file__).parent / 'scripts'



def _env(devices):
  return dict(os.environ, XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu',
              PYTHONPATH=str(REPO))


def test_eight_devices_equal_one_device_sync_and_local():
  result = subprocess.run([sys.executable, str(SCRIPTS / 'parallel_check.py')], env=_env(8), capture_output=True,
                          text=True, timeout=600, cwd=REPO)
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'all parallel checks passed' in result.stdout, result.stdout
  for name in ('sync losses', 'sync params', 'sync moving statistics', 'local losses = 1-device ghost',
               'local params = 1-device ghost', 'local moving statistics = 1-device ghost',
               'indivisible batch rejected', 'evaluation on 8 devices = 1 device (moving statistics)',
               'evaluation on 8 devices = 1 device (batch statistics)'):
    assert f'ok {name}' in result.stdout, result.stdout


@pytest.mark.parametrize('overrides, message', [
    (dict(batch_size=100, num_devices=8), '--batch_size=100 is invalid: expected a multiple of --num_devices=8'),
    (dict(num_devices=0), '--num_devices=0'),
    (dict(cross_device_stats='both'), '--cross_device_stats'),
    (dict(norm='ghost', virtual_batch_size=100, batch_size=400, num_devices=8), 'per-device batch'),
    (dict(num_processes=2, process_id=2), '--process_id=2'),
])
def test_invalid_parallel_settings_are_rejected(overrides, message):
  with pytest.raises(ValueError) as error:
    config_lib.validate(config_lib.TrainConfig(**overrides))
  assert message in str(error.value)


def test_cli_on_eight_devices(tmp_path):
  data_dir = write_learnable_mnist(tmp_path / 'data')
  flags = [f'--data_dir={data_dir}', '--data_source=files', '--steps=6', '--batch_size=96', '--progress=false',
           '--cross_device_stats=local']
  result = subprocess.run([sys.executable, 'experiments/train.py', *flags, f'--workdir={tmp_path / "run"}'],
                          env=_env(8), capture_output=True, text=True, timeout=600, cwd=REPO)
  assert result.returncode == 0, result.stdout + result.stderr
  assert (tmp_path / 'run' / 'summary.json').exists() and (tmp_path / 'run' / 'checkpoints').exists()
  assert '"num_devices": 8' in (tmp_path / 'run' / 'config.json').read_text()
  result = subprocess.run([sys.executable, 'experiments/train.py', *flags[:3], '--batch_size=100', '--num_devices=8'],
                          env=_env(8), capture_output=True, text=True, timeout=120, cwd=REPO)
  assert result.returncode != 0 and 'expected a multiple of --num_devices=8' in result.stderr, result.stderr


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
  script, port = str(SCRIPTS / 'multiprocess_check.py'), str(_free_port())
  single = subprocess.run([sys.executable, script, port, '-1', str(tmp_path / 'single.npz')], env=_env(1),
                          capture_output=True, text=True, timeout=300, cwd=REPO)
  assert single.returncode == 0, single.stdout + single.stderr
  processes = [subprocess.Popen([sys.executable, script, port, str(i), str(tmp_path / 'multi.npz')], env=_env(4),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
               for i in range(2)]
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=300)[0])
  except subprocess.TimeoutExpired:
    for process in processes:
      process.kill()
    pytest.skip('two CPU processes did not finish in 300 s: this jax cannot run multi-process CPU collectives here')
  if any(p.returncode for p in processes):
    log = '\n'.join(outputs)
    if 'collective' in log.lower() and ('not implemented' in log.lower() or 'unimplemented' in log.lower()):
      pytest.skip(f'the installed jax cannot run multi-process CPU collectives: {log[-500:]}')
    raise AssertionError(log)
  want, got = np.load(tmp_path / 'single.npz'), np.load(tmp_path / 'multi.npz')
  assert sorted(want) == sorted(got)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=2e-5, err_msg=key)
