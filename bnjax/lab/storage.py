"""Files that several processes share: atomic writes, claims on work, worker flags.

    storage.write_json_atomic(sweep_dir / 'runs' / f'{run_id}.json', record)
    record = storage.read_json(path, default=None)

    claim = storage.claim(sweep_dir / 'claims' / group_id, owner=worker, stale_after=600)
    if claim is not None:
      with claim:             # heartbeats from a thread; released at exit, also on errors
        train(group)
      if claim.taken_over:    # we stalled past `stale_after`: another worker may have trained it too
        ...

Atomic writes. Each write goes to its own temporary file in the target's
folder (named `.<name>.<pid>.<random>.tmp`: hidden, and `*.json` never matches
it), is flushed and fsynced, then renamed over the target with `os.replace`,
which is atomic within a folder on POSIX file systems (also NFS, Lustre, GPFS).
A reader sees the old file or the new one, never a mix; two writers never share
a temporary file; a failed write (a full disk, a value json cannot encode)
removes its temporary file and re-raises. The folder itself is not fsynced: a
power cut may lose the last rename (the previous version stays), never the
file's content.

Claims. A claim is a folder of numbered entries, `<path>/00000000.claim`,
`00000001.claim`, ...; the highest number says who holds it:

- no entry, or a release entry (`{"released": true, ...}`): free;
- a holder's entry `{owner, host, boot_id, pid_namespace, pid, started, heartbeat, generation}` whose
  heartbeat is at most `stale_after` seconds old: held (an entry still being
  written counts its file's modification time as its heartbeat);
- a holder's entry with an older heartbeat: stale, free to take over.

Claiming, taking over and releasing all do one thing: create the entry after
the highest with `os.open(..., O_CREAT | O_EXCL | O_WRONLY)`. Exactly one
process can create a given entry, so of N workers that find the same entry free
or stale exactly one wins (the others find its fresh entry and give up); a
release by a holder that was taken over finds its next entry taken, and
changes nothing. Entries are never rewritten by anyone but their creator (the
heartbeat, atomically) and never deleted (but by a creator whose write of it
failed), so no check-then-act race remains: a heartbeat that races a takeover
rewrites an entry that is no longer the highest, which changes nothing. The
folder doubles as a log of who held the work when.

Why not one claim file? Taking over a stale file means removing it first, and
POSIX cannot remove (or rename away) a file only if it is still the stale one:
between a worker's check and its rename another worker may already have taken
over and created a fresh claim, which the rename then moves away, and both
believe they won.

Assumptions (as in any lease): clocks of the hosts agree to well within
`stale_after` (heartbeats are compared with the reader's `time.time()`), and a
holder whose heartbeats stop for longer than `stale_after` (a stalled node)
may lose its claim; it learns so from `Claim.taken_over` / `still_owned()`.

Workers. `resolve_workers` turns `--num_workers` / `--worker_index` (or a SLURM
job array) into a checked `(num_workers, worker_index)` pair.

Standard library only: this module never imports jax.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Mapping

_REQUIRED = object()
_ENTRY = re.compile(r'^(\d+)\.claim$')
# Tries of `claim` when other workers keep creating entries first (each try is a step of theirs).
_CLAIM_ATTEMPTS = 16


class CorruptFileError(ValueError):
  """A file that exists but does not hold valid JSON."""


# --- atomic writes --------------------------------------------------------------------------------------------


def temporary_path(path: str | os.PathLike) -> Path:
  """A fresh temporary name beside `path`: hidden, `.tmp`-suffixed, unique to this process and call."""
  path = Path(path)
  return path.with_name(f'.{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp')


def _write_all(fd: int, data: bytes) -> None:
  """Writes every byte of `data` to `fd` (`os.write` may write fewer)."""
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view):]


def _create_exclusive(path: Path, data: bytes) -> None:
  """Creates `path` holding `data`, fsynced; raises FileExistsError if it exists; no partial file left on errors."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    try:
      _write_all(fd, data)
      os.fsync(fd)
    finally:
      os.close(fd)
  except BaseException:
    _remove_quietly(path)
    raise


def _remove_quietly(path: Path) -> None:
  try:
    os.unlink(path)
  except FileNotFoundError:
    pass


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Replaces `path` by `data` atomically: readers see the old or the new file, never a mix.

  Writes a temporary file unique to this call in the same folder, fsyncs it
  and renames it over `path`. On any error (a full disk: OSError ENOSPC) the
  temporary file is removed and the error re-raised; `path` keeps its old
  content.
  """
  path = Path(path)
  tmp = temporary_path(path)
  _create_exclusive(tmp, data)
  try:
    os.replace(tmp, path)
  except BaseException:
    _remove_quietly(tmp)
    raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Replaces `path` by `text` (UTF-8) atomically; see `write_bytes_atomic`."""
  write_bytes_atomic(path, text.encode('utf-8'))


def json_text(value: Any) -> str:
  """The JSON of `value` as the lab writes it: indent 2, sorted keys, `str` for unknown types, final newline."""
  return json.dumps(value, indent=2, sort_keys=True, default=str) + '\n'


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
  """Replaces `path` by the JSON of `value` atomically (see `json_text`, `write_bytes_atomic`).

  The value is encoded before any file is touched, so a value that cannot be
  encoded raises with no file created and `path` unchanged.
  """
  write_text_atomic(path, json_text(value))


def read_json(path: str | os.PathLike, default: Any = _REQUIRED) -> Any:
  """The JSON value in `path`.

  Args:
    path: the file.
    default: returned when `path` does not exist; if not given, a missing
      file raises FileNotFoundError.

  Raises:
    CorruptFileError (a ValueError) naming the file, when it exists but is not
    valid UTF-8 JSON (an empty file included): a file written with
    `write_json_atomic` never is, so it was cut short by an older non-atomic
    writer or edited by hand; it is not silently replaced by `default`, which
    would hide (and then overwrite) a result.
  """
  try:
    data = Path(path).read_bytes()
  except FileNotFoundError:
    if default is _REQUIRED:
      raise
    return default
  try:
    return json.loads(data.decode('utf-8'))
  except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError
    raise CorruptFileError(
        f'{path} is not valid JSON ({error}; {len(data)} bytes): it was cut short or edited by hand. '
        'Fix it, or delete it to recompute what it held.') from error


# --- claims ---------------------------------------------------------------------------------------------------


def _entry_path(directory: Path, generation: int) -> Path:
  return directory / f'{generation:08d}.claim'


def _generations(directory: Path) -> list[int]:
  """The entry numbers in a claim folder, ascending (temporary files and other names ignored)."""
  return sorted(int(m.group(1)) for name in os.listdir(directory) if (m := _ENTRY.match(name)))


def _read_entry(path: Path) -> tuple[dict | None, float]:
  """`(record, modification time)` of an entry; record None while it is still being written."""
  with open(path, 'rb') as f:
    mtime = os.fstat(f.fileno()).st_mtime
    data = f.read()
  try:
    record = json.loads(data.decode('utf-8'))
  except ValueError:
    return None, mtime
  return (record if isinstance(record, dict) else None), mtime


def entry_is_live(record: dict | None, mtime: float, now: float, stale_after: float) -> bool:
  """Whether a claim entry holds its work at time `now` (a holder whose heartbeat is at most `stale_after` old).

  A release entry is not live. An entry with no readable heartbeat (its
  creator is writing it, or died while writing it) counts `mtime` instead.
  """
  if record is not None and record.get('released'):
    return False
  if record is not None and holder_died_here(record):
    return False
  heartbeat = record.get('heartbeat') if record is not None else None
  if not isinstance(heartbeat, (int, float)):
    heartbeat = mtime
  return now - heartbeat <= stale_after


def _boot_id() -> str | None:
  """This kernel's boot id (Linux), None elsewhere: with the host name it says 'this machine, this boot'."""
  try:
    return Path('/proc/sys/kernel/random/boot_id').read_text().strip() or None
  except OSError:
    return None


def _pid_namespace() -> str | None:
  """This process's PID namespace (Linux: e.g. 'pid:[4026531836]'), None where it can't be read.

  Two containers on one host (host networking: the same host name) number
  their processes apart: a pid means something only within its namespace.
  """
  try:
    return os.readlink('/proc/self/ns/pid')
  except OSError:
    return None


def holder_died_here(record: dict) -> bool:
  """Whether a claim's holder ran on this machine, in this boot and PID namespace, and its process is gone.

  Such a claim (its worker was killed, or stopped with Ctrl-C) is taken over
  at once instead of after `stale_after` seconds (a user re-running a sweep
  they stopped doesn't wait for the heartbeat to age). The pid is trusted
  only when host name, boot id and PID namespace all match ours: holders
  elsewhere (another container with the same host name included), or
  where the machine can't tell, only go stale.
  """
  boot_id = _boot_id()
  namespace = _pid_namespace()
  pid = record.get('pid')
  if boot_id is None or record.get('boot_id') != boot_id or record.get('host') != socket.gethostname():
    return False
  if namespace is None or record.get('pid_namespace') != namespace:
    return False
  if not isinstance(pid, int) or pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except OSError:  # it exists (another user's process: EPERM)
    return False
  return False


def _claim_folder(path: str | os.PathLike) -> Path:
  directory = Path(path)
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except FileExistsError:
    raise NotADirectoryError(
        f'claim path {directory} is a file; a claim is a folder of numbered entries: pass a path where a '
        'folder can be made (e.g. <sweep_dir>/claims/<group_id>), or remove the file.') from None
  return directory


def claim(path: str | os.PathLike, *, owner: str, stale_after: float) -> Claim | None:
  """Claims the work named by the folder `path`; None if another holder's claim is live.

  Free (never claimed, or released) and stale (heartbeat older than
  `stale_after` seconds) claims are taken; of several processes racing for
  the same claim exactly one gets it (see the module docstring for how).

  Args:
    path: the claim's folder (made if missing), e.g. `<sweep_dir>/claims/<group_id>`.
    owner: who claims, for people reading the folder (e.g. 'worker-3 job 81234').
    stale_after: seconds without a heartbeat after which other workers may
      take the claim over. Use the claim as a context manager to heartbeat
      every `stale_after / 4` seconds while the work runs.

  Returns:
    The `Claim`, or None when another holder's claim is live.
  """
  if not (isinstance(stale_after, (int, float)) and math.isfinite(stale_after) and stale_after > 0):
    raise ValueError(f'stale_after={stale_after!r}: expected a finite positive number of seconds (e.g. 600).')
  if not (isinstance(owner, str) and owner):
    raise ValueError(f'owner={owner!r}: expected a non-empty name for the claimer (e.g. "worker-3").')
  directory = _claim_folder(path)
  for _ in range(_CLAIM_ATTEMPTS):
    generations = _generations(directory)
    generation = generations[-1] + 1 if generations else 0
    if generations:
      try:
        record, mtime = _read_entry(_entry_path(directory, generations[-1]))
      except FileNotFoundError:  # deleted by hand (entries are never deleted here): look again
        continue
      if entry_is_live(record, mtime, time.time(), stale_after):
        return None
    now = time.time()
    record = {'owner': owner, 'host': socket.gethostname(), 'boot_id': _boot_id(), 'pid_namespace': _pid_namespace(),
              'pid': os.getpid(), 'started': now, 'heartbeat': now, 'generation': generation}
    try:
      _create_exclusive(_entry_path(directory, generation), json_text(record).encode('utf-8'))
    except FileExistsError:  # another worker made this entry first: see what it is
      continue
    return Claim(directory, generation, record, stale_after)
  return None


class Claim:
  """A claim this process holds (from `claim`): heartbeat, release, and a context manager doing both.

  As a context manager it heartbeats from a daemon thread every
  `stale_after / 4` seconds and releases at exit (also when the block
  raises). `taken_over` tells afterwards whether another worker took the
  claim over meanwhile (this process stalled past `stale_after`).
  """

  def __init__(self, directory: Path, generation: int, record: dict, stale_after: float):
    self.path = directory
    self.generation = generation
    self.record = record
    self.stale_after = stale_after
    self.released = False
    self.taken_over = False
    self.heartbeat_error: OSError | None = None  # the last heartbeat that failed (the thread keeps trying)
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  @property
  def file(self) -> Path:
    """This claim's entry in the claim folder."""
    return _entry_path(self.path, self.generation)

  @property
  def owner(self) -> str:
    return self.record['owner']

  def still_owned(self) -> bool:
    """Whether this claim is still the folder's highest entry (not released, not taken over)."""
    return _generations(self.path)[-1:] == [self.generation]

  def heartbeat(self) -> bool:
    """Refreshes the heartbeat if the claim is still ours; returns whether it is.

    A takeover racing this call makes the rewrite land on an entry that is no
    longer the highest, which nobody reads: harmless.
    """
    with self._lock:
      if self.released:
        return False
      if not self.still_owned():
        self.taken_over = True
        return False
      record = dict(self.record, heartbeat=time.time())
      write_json_atomic(self.file, record)
      self.record = record
      return True

  def release(self) -> bool:
    """Frees the claim if it is still ours; returns whether it was (False: taken over, nothing changed).

    Releasing twice is harmless (the second call returns True, changing nothing).
    """
    with self._lock:
      if self.released:
        return True
      record = {'released': True, 'owner': self.owner, 'host': socket.gethostname(), 'pid': os.getpid(),
                'released_at': time.time(), 'generation': self.generation + 1}
      try:
        _create_exclusive(_entry_path(self.path, self.generation + 1), json_text(record).encode('utf-8'))
      except FileExistsError:  # another worker made the next entry: it took the claim over
        self.taken_over = True
        return False
      self.released = True
      return True

  def _beat(self) -> None:
    while not self._stop.wait(self.stale_after / 4):
      try:
        if not self.heartbeat():
          return
      except OSError as error:  # e.g. a file server hiccup: try again; if it lasts, the claim goes stale
        self.heartbeat_error = error

  def __enter__(self) -> Claim:
    if self._thread is not None:
      raise RuntimeError(f'claim {self.path} is already in use as a context manager; enter it once.')
    self._thread = threading.Thread(target=self._beat, name=f'heartbeat {self.path.name}', daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._stop.set()
    self._thread.join()
    self.release()

  def __repr__(self) -> str:
    return f'Claim({str(self.path)!r}, generation={self.generation}, owner={self.owner!r})'


# --- workers --------------------------------------------------------------------------------------------------


def _env_int(environ: Mapping[str, str], name: str, flag: str) -> int | None:
  value = environ.get(name)
  if value is None or value == '':
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r} is not an integer: pass {flag} explicitly.') from None


def resolve_workers(num_workers: int | None, worker_index: int | None,
                    environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
  """`(num_workers, worker_index)` of this process, from its flags or else its SLURM job array.

  A flag left None is read from the environment: `num_workers` from
  SLURM_ARRAY_TASK_COUNT, `worker_index` from SLURM_ARRAY_TASK_ID as
  `(id - SLURM_ARRAY_TASK_MIN) // SLURM_ARRAY_TASK_STEP` (array ids need not
  start at 0, e.g. `--array=1-8`); outside a job array, 1 worker of index 0.
  Flags given explicitly win over the environment.

  Raises:
    ValueError (one line, naming `--num_workers` or `--worker_index`) unless
    num_workers >= 1 and 0 <= worker_index < num_workers.
  """
  source = 'given'
  if num_workers is None:
    source = 'from SLURM_ARRAY_TASK_COUNT'
    num_workers = _env_int(environ, 'SLURM_ARRAY_TASK_COUNT', '--num_workers')
    num_workers = 1 if num_workers is None else num_workers
  if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
    raise ValueError(f'--num_workers={num_workers!r} ({source}): expected an integer >= 1, the number of worker '
                     'processes sharing the sweep folder.')
  source = 'given'
  if worker_index is None:
    task_id = _env_int(environ, 'SLURM_ARRAY_TASK_ID', '--worker_index')
    task_min = _env_int(environ, 'SLURM_ARRAY_TASK_MIN', '--worker_index') or 0
    task_step = _env_int(environ, 'SLURM_ARRAY_TASK_STEP', '--worker_index') or 1
    worker_index = 0 if task_id is None else (task_id - task_min) // task_step
    if task_id is not None:
      source = f'from SLURM_ARRAY_TASK_ID={task_id}, min {task_min}, step {task_step}'
  if isinstance(worker_index, bool) or not isinstance(worker_index, int) or not 0 <= worker_index < num_workers:
    raise ValueError(f'--worker_index={worker_index!r} ({source}): expected an integer in [0, {num_workers}) for '
                     f'--num_workers={num_workers}: give each worker its own index 0..{num_workers - 1} (under '
                     'SLURM, a contiguous --array such as --array=0-N), or pass both flags explicitly.')
  return num_workers, worker_index
