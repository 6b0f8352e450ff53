"""bnjax.norm's `axis_name` on 8 CPU devices (in a subprocess: XLA_FLAGS must precede jax's import)."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / 'scripts' / 'sharded_norm_check.py'


def test_cross_device_statistics_equal_whole_batch_statistics():
  env = dict(os.environ, XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'all sharded checks passed' in result.stdout
  assert result.stdout.count('ok ') == 38, result.stdout
