"""bnjax.lab.storage: atomic writes under concurrent writers and readers, claims, worker flags.

The races run in real processes (tests/scripts/storage_stress.py). They use
a folder in /dev/shm where there is one: fsync costs ~8 ms on a disk, which
would make 2 x 2000 writes take half a minute; renames are as atomic there.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bnjax.lab import storage
from conftest import REPO

SCRIPT = Path(__file__).parent / 'scripts' / 'storage_stress.py'


@pytest.fixture
def fast_dir(tmp_path):
  """A fresh folder on a RAM file system if there is one, else under tmp_path."""
  if not os.access('/dev/shm', os.W_OK):
    yield tmp_path
    return
  folder = Path(tempfile.mkdtemp(prefix='bnjax-storage-', dir='/dev/shm'))
  yield folder
  shutil.rmtree(folder, ignore_errors=True)


def _spawn(*args):
  return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=REPO)


def _finish(process, timeout=60):
  out, err = process.communicate(timeout=timeout)
  assert process.returncode == 0, out + err
  return out


# --- atomic writes --------------------------------------------------------------------------------------------


def test_two_writers_and_a_reader_never_clash(fast_dir):
  path, stop = fast_dir / 'record.json', fast_dir / 'stop'
  storage.write_json_atomic(path, {'writer': 'init', 'i': 0, 'payload': 'x' * 3000, 'tail': ['init', 0]})
  reader = _spawn('read', path, stop)
  start = time.time() + 0.5  # every writer has started by then
  writers = [_spawn('write', path, 2000, name, start) for name in ('a', 'b')]
  try:
    outs = [_finish(w) for w in writers]
  finally:
    stop.touch()
  reads = _finish(reader)
  assert outs == ['wrote 2000\n'] * 2
  assert int(reads.split()[1]) > 100, reads
  assert json.loads(path.read_text())['i'] == 1999
  assert sorted(p.name for p in fast_dir.iterdir()) == ['record.json', 'stop']  # no temporary file left


def test_write_json_atomic_format_and_read_json(tmp_path):
  path = tmp_path / 'summary.json'
  storage.write_json_atomic(path, {'b': 1, 'a': Path('/x'), 'nan': float('nan')})
  assert path.read_text() == '{\n  "a": "/x",\n  "b": 1,\n  "nan": NaN\n}\n'
  got = storage.read_json(path)
  assert got['a'] == '/x' and got['b'] == 1 and got['nan'] != got['nan']
  storage.write_text_atomic(path, 'plain')
  assert path.read_text() == 'plain'


def test_temporary_names_are_hidden_unique_and_never_json(tmp_path):
  names = {storage.temporary_path(tmp_path / 'run.json').name for _ in range(100)}
  assert len(names) == 100
  name = names.pop()
  assert name.startswith(f'.run.json.{os.getpid()}.') and name.endswith('.tmp')
  (tmp_path / name).touch()
  assert list(tmp_path.glob('*.json')) == []


class _Unprintable:

  def __str__(self):
    raise RuntimeError('no text for this value')


@pytest.mark.parametrize('failing', ['write', 'fsync', 'replace', 'encode', 'encode_default'])
def test_failed_write_leaves_old_content_and_no_temporary(tmp_path, monkeypatch, failing):
  path = tmp_path / 'config.json'
  storage.write_json_atomic(path, {'old': True})
  before = path.read_text()
  value = {'new': 'y' * 10000}
  if failing == 'encode':
    value = {(1, 2): 'tuple keys cannot be encoded'}
  elif failing == 'encode_default':
    value = {'x': _Unprintable()}
  else:
    def full_disk(*args):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, failing, full_disk)
  with pytest.raises((OSError, TypeError, RuntimeError)) as raised:
    storage.write_json_atomic(path, value)
  monkeypatch.undo()
  if failing in ('write', 'fsync', 'replace'):
    assert raised.value.errno == errno.ENOSPC
  assert path.read_text() == before
  assert os.listdir(tmp_path) == ['config.json']


def test_read_json_missing_and_corrupt(tmp_path):
  missing = tmp_path / 'missing.json'
  assert storage.read_json(missing, default=None) is None
  assert storage.read_json(missing, default={}) == {}
  with pytest.raises(FileNotFoundError):
    storage.read_json(missing)
  for content in (b'', b'{"a": 1', b'\xff\xfe'):
    corrupt = tmp_path / 'corrupt.json'
    corrupt.write_bytes(content)
    with pytest.raises(storage.CorruptFileError, match='corrupt.json is not valid JSON'):
      storage.read_json(corrupt, default=None)  # a default covers a missing file only


def test_storage_imports_no_jax_nor_numpy():
  assert _finish(_spawn('imports')).strip() == ''


# --- claims ---------------------------------------------------------------------------------------------------


def _make_stale(held):
  """Backdates a claim's heartbeat, as a holder that stopped beating long ago would have left it."""
  storage.write_json_atomic(held.file, dict(held.record, heartbeat=time.time() - 3600))


def test_claim_is_exclusive_until_released(tmp_path):
  path = tmp_path / 'claims' / 'group-0'
  first = storage.claim(path, owner='w0', stale_after=60)
  assert first is not None and first.still_owned()
  assert storage.claim(path, owner='w1', stale_after=60) is None
  record = storage.read_json(first.file)
  assert {k: record[k] for k in ('owner', 'pid', 'generation')} == {'owner': 'w0', 'pid': os.getpid(), 'generation': 0}
  assert record['started'] == record['heartbeat']
  assert first.release() and first.release()  # twice is harmless
  assert not first.still_owned() and not first.taken_over
  second = storage.claim(path, owner='w1', stale_after=60)
  assert second is not None and second.generation == 2
  assert sorted(os.listdir(path)) == ['00000000.claim', '00000001.claim', '00000002.claim']
  assert storage.read_json(path / '00000001.claim')['released'] is True


def test_stale_claim_is_taken_over_by_exactly_one_of_six_racers(fast_dir):
  for round_ in range(2):
    path = fast_dir / f'group-{round_}'
    _make_stale(storage.claim(path, owner='stalled', stale_after=5))
    start = time.time() + 1.0  # every racer has started by then (stdlib only)
    racers = [_spawn('claim', path, 5, start, f'racer-{i}') for i in range(6)]
    outcomes = sorted(_finish(r).strip() for r in racers)
    assert outcomes == ['lost'] * 5 + ['won'], outcomes
    assert storage.read_json(path / '00000001.claim')['owner'].startswith('racer-')
    assert sorted(os.listdir(path)) == ['00000000.claim', '00000001.claim']
    # The winner has exited without releasing: on this machine that is seen at once, not after 5 s.
    late = storage.claim(path, owner='late', stale_after=5)
    assert late is not None and late.generation == 2


def test_live_claim_with_heartbeats_is_never_taken_over(tmp_path):
  path, stale_after = tmp_path / 'group', 0.5  # (generous: a loaded machine may delay the heartbeat thread)
  held = storage.claim(path, owner='busy', stale_after=stale_after)
  with held:
    deadline = time.time() + 3 * stale_after
    tries = 0
    while time.time() < deadline:
      assert storage.claim(path, owner='thief', stale_after=stale_after) is None
      tries += 1
      time.sleep(0.01)
    assert storage.read_json(held.file)['heartbeat'] > time.time() - stale_after
  assert tries > 20 and not held.taken_over and held.released
  assert storage.claim(path, owner='next', stale_after=stale_after) is not None


def test_claim_released_when_the_block_raises(tmp_path):
  held = storage.claim(tmp_path / 'group', owner='w', stale_after=60)
  with pytest.raises(ZeroDivisionError):
    with held:
      1 / 0
  assert held.released
  assert storage.claim(tmp_path / 'group', owner='w', stale_after=60) is not None


def _killed_holder(path, stale_after):
  holder = _spawn('hold', path, stale_after)
  try:
    assert holder.stdout.readline() == 'claimed\n', holder.stderr.read()
    assert storage.claim(path, owner='w', stale_after=stale_after) is None
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=10)


def test_a_worker_killed_on_this_machine_is_taken_over_at_once(fast_dir):
  path = fast_dir / 'group'
  _killed_holder(path, 600.0)
  taken = storage.claim(path, owner='w', stale_after=600.0)  # its process is gone: no need to wait 600 s
  assert taken is not None and taken.generation == 1


def test_a_silent_worker_elsewhere_becomes_claimable_after_stale_after(fast_dir):
  path, stale_after = fast_dir / 'group', 1.0
  _killed_holder(path, stale_after)
  entry = next(path.glob('*.claim'))
  record = json.loads(entry.read_text())
  entry.write_text(json.dumps(dict(record, host='another-machine', heartbeat=time.time())))  # we can't see its pid
  assert storage.claim(path, owner='w', stale_after=stale_after) is None  # its last heartbeat is still recent
  time.sleep(stale_after + 0.05)
  taken = storage.claim(path, owner='w', stale_after=stale_after)
  assert taken is not None and taken.generation == 1


def test_a_live_holder_on_this_machine_keeps_its_claim():
  record = {'host': storage.socket.gethostname(), 'boot_id': storage._boot_id(),
            'pid_namespace': storage._pid_namespace(), 'pid': os.getppid()}
  assert not storage.holder_died_here(record)  # a live process
  assert not storage.holder_died_here(dict(record, boot_id='another boot'))


def test_a_holder_in_another_pid_namespace_is_judged_by_its_heartbeat(fast_dir):
  """A container on this host (host networking: our host name, our boot) numbers its processes apart: its
  pid says nothing here. A pid that is dead in our namespace must not free its live claim."""
  path, stale_after = fast_dir / 'group', 1.0
  _killed_holder(path, stale_after)  # a pid that exists in no process of ours
  entry = next(path.glob('*.claim'))
  record = json.loads(entry.read_text())
  assert record['pid_namespace'] == storage._pid_namespace() and storage.holder_died_here(record)
  entry.write_text(json.dumps(dict(record, pid_namespace='pid:[1]', heartbeat=time.time())))
  assert not storage.holder_died_here(json.loads(entry.read_text()))
  assert storage.claim(path, owner='w', stale_after=stale_after) is None  # its heartbeat is fresh: held
  assert not storage.holder_died_here({k: v for k, v in record.items() if k != 'pid_namespace'})  # an older record
  time.sleep(stale_after + 0.05)
  taken = storage.claim(path, owner='w', stale_after=stale_after)
  assert taken is not None and taken.generation == 1


def test_former_owner_cannot_release_or_heartbeat_a_taken_over_claim(tmp_path):
  path = tmp_path / 'group'
  former = storage.claim(path, owner='former', stale_after=60)
  _make_stale(former)
  current = storage.claim(path, owner='current', stale_after=60)
  assert current is not None
  assert not former.still_owned()
  assert not former.heartbeat() and former.taken_over
  assert not former.release() and not former.released
  assert current.still_owned()
  assert storage.claim(path, owner='third', stale_after=60) is None
  assert current.release() and not current.taken_over


def test_entry_being_written_counts_its_modification_time(tmp_path):
  path = tmp_path / 'group'
  path.mkdir()
  entry = path / '00000000.claim'
  entry.touch()  # a claimer between its O_EXCL create and its write
  assert storage.claim(path, owner='w', stale_after=60) is None
  os.utime(entry, (time.time() - 120, time.time() - 120))  # ... which died there two minutes ago
  assert storage.claim(path, owner='w', stale_after=60).generation == 1


def test_claim_rejects_bad_arguments(tmp_path):
  (tmp_path / 'file').touch()
  with pytest.raises(NotADirectoryError, match='is a file'):
    storage.claim(tmp_path / 'file', owner='w', stale_after=60)
  for bad in (0, float('inf'), float('nan')):
    with pytest.raises(ValueError, match=f'stale_after={bad!r}'):
      storage.claim(tmp_path / 'group', owner='w', stale_after=bad)
  with pytest.raises(ValueError, match='owner'):
    storage.claim(tmp_path / 'group', owner='', stale_after=60)


# --- workers --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('environ, want', [
    ({}, (1, 0)),
    ({'SLURM_ARRAY_TASK_COUNT': '4', 'SLURM_ARRAY_TASK_ID': '2', 'SLURM_ARRAY_TASK_MIN': '0'}, (4, 2)),
    ({'SLURM_ARRAY_TASK_COUNT': '8', 'SLURM_ARRAY_TASK_ID': '8', 'SLURM_ARRAY_TASK_MIN': '1'}, (8, 7)),
    ({'SLURM_ARRAY_TASK_COUNT': '3', 'SLURM_ARRAY_TASK_ID': '14', 'SLURM_ARRAY_TASK_MIN': '10',
      'SLURM_ARRAY_TASK_STEP': '2'}, (3, 2)),
    ({'SLURM_ARRAY_TASK_COUNT': '3', 'SLURM_ARRAY_TASK_ID': '1'}, (3, 1)),
])
def test_resolve_workers_from_slurm(environ, want):
  assert storage.resolve_workers(None, None, environ) == want


def test_resolve_workers_explicit_flags_win():
  environ = {'SLURM_ARRAY_TASK_COUNT': '4', 'SLURM_ARRAY_TASK_ID': '3', 'SLURM_ARRAY_TASK_MIN': '0'}
  assert storage.resolve_workers(2, 1, environ) == (2, 1)
  assert storage.resolve_workers(8, None, environ) == (8, 3)
  assert storage.resolve_workers(None, 0, environ) == (4, 0)


@pytest.mark.parametrize('num_workers, worker_index, environ, flag', [
    (0, 0, {}, '--num_workers=0'),
    (-2, None, {}, '--num_workers=-2'),
    (2, 2, {}, '--worker_index=2'),
    (2, -1, {}, '--worker_index=-1'),
    (None, None, {'SLURM_ARRAY_TASK_COUNT': '0'}, '--num_workers=0'),
    (None, None, {'SLURM_ARRAY_TASK_COUNT': 'four'}, '--num_workers'),
    (None, None, {'SLURM_ARRAY_TASK_COUNT': '2', 'SLURM_ARRAY_TASK_ID': '5'}, '--worker_index=5'),
    (2, None, {'SLURM_ARRAY_TASK_ID': 'x'}, '--worker_index'),
])
def test_resolve_workers_rejects_bad_values(num_workers, worker_index, environ, flag):
  with pytest.raises(ValueError, match=flag) as raised:
    storage.resolve_workers(num_workers, worker_index, environ)
  assert '\n' not in str(raised.value)
