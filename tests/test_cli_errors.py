"""Every user error of the CLIs (beyond the invalid flags of test_train_cli.py) ends in one line that names the flag or file, exit 2 (usage) or 1, no debris."""

import gzip
import shutil

import numpy as np
import pytest

from conftest import mounted_tmpfs, run_script
from fixtures import write_idx


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


def _fewer_labels(path):
  labels = path.with_name('train-labels-idx1-ubyte.gz')
  write_idx(labels, np.zeros(7, np.uint8))


def _empty_folder(path):
  shutil.rmtree(path.parent)


DATA_CASES = {
    'truncated': (_truncate, 'train-images'),
    'wrong magic': (_wrong_magic, 'train-images'),
    'missing file': (lambda path: path.unlink(), 'mnist'),
    'wrong label count': (_fewer_labels, 'labels'),
    'empty folder': (_empty_folder, 'mnist'),
}


@pytest.mark.parametrize('case', DATA_CASES)
def test_data_errors(case, data_dir, tmp_path):
  folder, path = _mnist_copy(data_dir, tmp_path)
  damage, needle = DATA_CASES[case]
  damage(path)
  result = run_script('train.py', f'--data_dir={folder}', '--data_source=files', '--epochs=1', '--progress=false',
                      f'--workdir={tmp_path / "w"}', timeout=300)
  _one_line(result, 2, needle)
  assert not (tmp_path / 'w').exists()  # nothing written before the data loads


def test_a_bad_cifar_pickle(tmp_path):
  folder = tmp_path / 'cifar10' / 'cifar-10-batches-py'
  folder.mkdir(parents=True)
  for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch', 'batches.meta']:
    (folder / name).write_bytes(b'not a pickle')
  result = run_script('train.py', f'--data_dir={tmp_path}', '--data_source=files', '--dataset=cifar10',
                      '--model=cifar_cnn', '--epochs=1', f'--workdir={tmp_path / "w"}', timeout=300)
  _one_line(result, 2, 'data_batch_1')
  assert not (tmp_path / 'w').exists()


def test_an_unreadable_file_says_permission_denied(tmp_path, monkeypatch):
  from bnjax.lab.data import formats

  path = write_idx(tmp_path / 'train-images-idx3-ubyte', np.zeros((2, 28, 28), np.uint8))

  def denied(self):
    raise PermissionError(13, 'Permission denied', str(self))

  monkeypatch.setattr(type(path), 'read_bytes', denied)
  with pytest.raises(formats.DataError, match='permission denied: make the file readable'):
    formats.read_idx(path)


FLAG_CASES = [
    ('train.py', ['--batch_size=100000'], 2, '--batch_size=100000'),
    ('train.py', ['--num_devices=64'], 2, '--num_devices=64'),
    ('train.py', ['--learning_rate=nan'], 2, '--learning_rate=nan'),
    ('train.py', ['--weight_decay=inf'], 2, '--weight_decay=inf'),
    ('train.py', ['--epochs=1.5'], 2, "--epochs='1.5'"),
    ('sweep.py', ['--epochs=1.5'], 2, "--epochs='1.5'"),
    ('sweep.py', ['--batch_size=abc'], 2, "--batch_size='abc'"),
    ('sweep.py', ['--max_group_size=-1'], 2, '--max_group_size=-1'),
    ('sweep.py', ['--claim_timeout=inf'], 2, '--claim_timeout=inf is invalid'),
    ('sweep.py', ['--claim_timeout=nan'], 2, '--claim_timeout=nan is invalid'),
    # A coordinator that doesn't answer: one line after --coordinator_timeout seconds, not a hang (JAX waits 300 s).
    ('train.py', ['--coordinator_address=127.0.0.1:1', '--num_processes=2', '--process_id=1',
                  '--coordinator_timeout=2'], 1, '--coordinator_address=127.0.0.1:1: no coordinator answered within 2 s'),
    ('study.py', ['--study=repro_renorm', '--epoch=3'], 2, 'epoch'),
    ('study.py', ['--study=fig2'], 2, "--study='fig2'"),
    ('study.py', ['--study=seed000'], 2, "--study='seed000' is invalid"),
    ('study.py', ['--study=repro_fig1', '--set=steps=3'], 2, "Unknown command line flag 'set'"),
    ('train.py', ['--preset=seed000'], 2, "Unknown command line flag 'preset'"),
    ('sweep.py', ['--preset=momentum'], 2, "Unknown command line flag 'preset'"),
    ('study.py', ['--study=repro_renorm', '--momentum=0.9'], 2, '--momentum'),
    ('train.py', ['--batch_size=1'], 2, '--batch_size=1 is invalid: expected at least 2 with --norm=bn'),
    ('train.py', ['--seed=1e30'], 2, '--seed=1000000000000000019884624838656 is invalid'),
    ('study.py', ['--study=repro_renorm', '--ghost_sizes=3,4', '--resume', '--overwrite'], 2, '--resume and --overwrite'),
]


@pytest.mark.parametrize('make, needle', [
    (lambda tmp: tmp / 'missing.csv', 'No such file or directory'),
    (lambda tmp: (tmp / 'other.csv').write_text('a,b\n1,2\n') and tmp / 'other.csv', 'lacks the columns run_id'),
    (lambda tmp: None, 'give one results.csv'),
])
def test_report_errors(make, needle, tmp_path):
  path = make(tmp_path)
  result = run_script('report.py', *([path] if path else []), timeout=120)
  _one_line(result, 1 if 'No such' in needle else 2, needle)


def test_a_study_ghost_size_names_its_flag(study_data_dir, tmp_path):
  result = run_script('study.py', '--study=small_batch_norms', '--ghost_sizes=3', f'--out={tmp_path}',
                      f'--data_dir={study_data_dir}', timeout=120)
  _one_line(result, 2, '--ghost_sizes=3 is invalid')
  assert not (tmp_path / 'small_batch_norms').exists()


@pytest.mark.parametrize('script, flags, code, needle', FLAG_CASES, ids=[' '.join(c[1]) for c in FLAG_CASES])
def test_bad_flags(script, flags, code, needle, data_dir, tmp_path):
  data = [f'--data_dir={data_dir}'] + (['--data_source=files'] if script != 'study.py' else [])
  result = run_script(script, *data, *flags, timeout=300, env={'HOME': str(tmp_path)})
  _one_line(result, code, needle)
  assert result.stdout.count('\n') < 5  # no help text before the error


def test_workdir_that_is_a_file(data_dir, tmp_path):
  (tmp_path / 'f').write_text('x')
  result = run_script('train.py', f'--data_dir={data_dir}', '--data_source=files', f'--workdir={tmp_path / "f"}')
  _one_line(result, 2, f'--workdir={tmp_path / "f"}', 'is a file')


@pytest.fixture
def tiny_disk(tmp_path):
  """A 1 MiB tmpfs: room for a run's config and metrics, not for its checkpoint (needs root; skipped without)."""
  yield from mounted_tmpfs(tmp_path / 'tiny', '1m')


def test_full_disk(data_dir, tiny_disk):
  result = run_script('train.py', f'--data_dir={data_dir}', '--data_source=files', '--epochs=1', '--batch_size=100',
                      '--progress=false', f'--workdir={tiny_disk / "w"}')
  _one_line(result, 1, 'the disk is full', 'checkpoints')
  leftovers = [p.name for p in tiny_disk.rglob('*') if p.name.endswith('.tmp') or 'orbax-checkpoint-tmp' in p.name]
  assert not leftovers
