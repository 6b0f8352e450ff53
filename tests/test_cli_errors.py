"""Every user error of the CLIs ends in one line that names the flag or file, exit 2 (usage) or 1, no debris."""

import gzip
import os
import shutil

import pytest

from conftest import run_script


def _one_line(result, code, *needles):
  lines = result.stderr.strip().splitlines()
  assert result.returncode == code, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert lines and lines[-1].startswith('error: '), result.stderr[-2000:]
  assert len([l for l in lines if l.startswith('error: ')]) == 1
  for needle in needles:
    assert needle in lines[-1], lines[-1]


def _mnist_copy(data_dir, tmp_path):
  folder = tmp_path / 'data'
  shutil.copytree(data_dir, folder)
  return folder, folder / 'mnist' / 'train-images-idx3-ubyte.gz'


def _truncate(path):
  path.write_bytes(path.read_bytes()[:100])


def _wrong_magic(path):
  raw = bytearray(gzip.decompress(path.read_bytes()))
  raw[2] = 0x09
  path.write_bytes(gzip.compress(bytes(raw)))


DATA_CASES = {
    'truncated': (_truncate, 'train-images'),
    'wrong magic': (_wrong_magic, 'train-images'),
    'missing file': (lambda path: path.unlink(), 'mnist'),
    'unreadable': (lambda path: os.chmod(path, 0), 'permission denied'),
}


@pytest.mark.parametrize('case', DATA_CASES)
def test_data_errors(case, data_dir, tmp_path):
  if case == 'unreadable' and os.geteuid() == 0:
    pytest.skip('root reads any file')
  folder, path = _mnist_copy(data_dir, tmp_path)
  damage, needle = DATA_CASES[case]
  damage(path)
  result = run_script('train.py', f'--data_dir={folder}', '--data_source=files', '--epochs=1', '--progress=false',
                      f'--workdir={tmp_path / "w"}', timeout=300)
  _one_line(result, 2, needle)
  assert not (tmp_path / 'w').exists()  # nothing written before the data loads


FLAG_CASES = [
    ('train.py', ['--batch_size=100000'], 2, '--batch_size=100000'),
    ('train.py', ['--num_devices=64'], 2, '--num_devices=64'),
    ('train.py', ['--learning_rate=nan'], 2, '--learning_rate=nan'),
    ('train.py', ['--weight_decay=inf'], 2, '--weight_decay=inf'),
    ('train.py', ['--epochs=1.5'], 2, '--epochs=.1.5.'),
    ('train.py', ['--norm=bn', '--rmax=2'], 2, '--rmax=2.0'),
    ('train.py', ['--resume'], 2, '--resume needs the --workdir'),
    ('train.py', ['--preset=seed999'], 2, "--study='seed999'"),
    ('sweep.py', ['--epochs=1.5'], 2, '--epochs=.1.5.'),
    ('sweep.py', ['--batch_size=abc'], 2, '--batch_size=.abc.'),
    ('sweep.py', ['--max_group_size=-1'], 2, '--max_group_size=-1'),
    ('study.py', ['--study=repro_renorm', '--epoch=3'], 1, None),  # absl: unknown flag
    ('study.py', ['--study=fig2'], 2, "--study='fig2'"),
    ('study.py', ['--study=repro_renorm', '--momentum=0.9'], 2, '--momentum'),
]


@pytest.mark.parametrize('script, flags, code, needle', FLAG_CASES, ids=[' '.join(c[1]) for c in FLAG_CASES])
def test_bad_flags(script, flags, code, needle, data_dir, tmp_path):
  result = run_script(script, f'--data_dir={data_dir}', '--data_source=files', *flags, timeout=300,
                      env={'HOME': str(tmp_path)})
  if needle is None:  # absl's own flag parsing: one FATAL line and a hint, exit 1
    assert result.returncode == 1 and 'Traceback' not in result.stderr and 'epoch' in result.stderr
    return
  _one_line(result, code, needle)
  assert result.stdout.count('\n') < 5  # no help text before the error


def test_workdir_that_is_a_file(data_dir, tmp_path):
  (tmp_path / 'f').write_text('x')
  result = run_script('train.py', f'--data_dir={data_dir}', '--data_source=files', f'--workdir={tmp_path / "f"}')
  _one_line(result, 2, f'--workdir={tmp_path / "f"}', 'is a file')
