"""bnjax.lab.host: the CLIs' host allocator setting."""

import platform

import pytest

from bnjax.lab import host
from conftest import run_script


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
