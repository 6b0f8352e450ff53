"""A run's folder: its identity, its outputs, its checkpoints; and the rules that keep two runs apart.

    folder = rundir.open_run(config, Path('runs/x'), resume=False, overwrite=False)
    sink = folder.epoch_sink()          # metrics.jsonl + TensorBoard, one call per epoch

Files (in the folder):
- `config.json`: the run's every setting, versions, device: also its identity;
- `metrics.jsonl`: one line per epoch;
- TensorBoard event files (`events.out.tfevents.*`): the same scalars per
  epoch, and the config as text (`tensorboard --logdir` over a sweep compares
  its lanes, one folder each);
- `summary.json`, `curves.png`; `checkpoints/` (Orbax), and
  `checkpoints-damaged/` where a checkpoint that could not be read was set
  aside; `.lock` while a process writes the run (it names the process).

The rules (a result can never be mixed with another run's):
- a folder that holds another run is refused, unless `overwrite` (which
  deletes that run's files first) or `resume`;
- one writer: a run holds an exclusive lock on its folder (`lock_folder`:
  `fcntl.flock` on `.lock`, which names the holder) from before its folder
  is checked until it ends; a second process is refused in one line;
- `resume` continues only the same run: every setting that changes results
  must be equal, except `epochs`/`steps` extended when nothing depends on the
  run's length (a constant learning rate) and the checkpoint ends at a whole
  epoch; otherwise the differing settings are named. A shorter length is
  refused. `resume` with no checkpoint says so;
- a folder its own run left before the first checkpoint is started again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable

from bnjax.lab import config as config_lib
from bnjax.lab import signals, storage

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'
CHECKPOINTS = 'checkpoints'
LOCK_FILE = '.lock'
# Scalars written to TensorBoard from each epoch's metrics.
TENSORBOARD_SCALARS = ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy', 'examples_per_second')
OUTPUTS = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, 'curves.png', CHECKPOINTS)


class RunDirError(ValueError):
  """A folder that can't take this run (holds another run, a file in the way, nothing to resume)."""


def _stored_config(folder: Path):
  path = folder / CONFIG_FILE
  if not path.is_file():
    return None
  try:
    stored = json.loads(path.read_text())['config']
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise RunDirError(f'{path} is unreadable ({error}); pass --overwrite to start a new run there, or choose '
                      'another --workdir.') from None
  known = {k: v for k, v in stored.items() if k in config_lib.FIELDS}
  return config_lib.TrainConfig(**known)


def length_can_change(config) -> bool:
  """Whether `epochs`/`steps` may change on resume: nothing else depends on the run's length."""
  return config.lr_schedule == 'constant'


def resume_conflicts(stored, config) -> list[str]:
  """The flags in which `config` differs from the stored run in a way that changes its results."""
  ignore = ('epochs', 'steps') if length_can_change(config) and length_can_change(stored) else ()
  return config_lib.differing_fields(stored, config, ignore)


# Folders this process holds the lock of: `{absolute path: (open lock file, the highest folder made for it or
# None)}` (flock belongs to the open file, so a second open in this process would conflict with the first; the
# lock goes with the process).
_HELD_LOCKS: dict[Path, tuple[Any, Path | None]] = {}


def lock_folder(folder: Path, flag: str | None = '--workdir') -> bool:
  """Takes the exclusive lock on `folder` (made if missing) for this process; returns whether it was newly taken.

  The lock (`fcntl.flock` on `folder/.lock`) is held until `unlock_folder` or
  the process ends (a kill included: the kernel drops it). The lock file
  holds `pid@host` of its holder, for the message another process gets.
  Taken again by its holder: nothing changes (returns False).

  Raises:
    RunDirError (one line, naming the holder) when another process holds it.
  """
  folder = Path(folder).absolute()
  if folder in _HELD_LOCKS:
    return False
  if folder.exists() and not folder.is_dir():
    raise RunDirError(f'{_where(folder, flag)} is a file, not a folder: choose a folder.')
  made = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / LOCK_FILE
  while True:
    lock = open(path, 'a+')
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock.seek(0)
      holder = lock.read().strip() or 'another process'
      lock.close()
      raise RunDirError(f'{_where(folder, flag)} is in use by {holder} (a run is writing there): wait for it to end, or '
                        'choose another folder.') from None
    except BaseException:
      lock.close()
      raise
    try:  # the file we locked may have been removed (`unlock_folder(discard=True)`) meanwhile: lock the new one
      if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
        break
    except FileNotFoundError:
      pass
    lock.close()
  lock.truncate(0)
  lock.write(f'{os.getpid()}@{socket.gethostname()}\n')
  lock.flush()
  _HELD_LOCKS[folder] = (lock, made)
  return True


def holds_lock(folder: Path) -> bool:
  """Whether this process holds the lock on `folder`."""
  return Path(folder).absolute() in _HELD_LOCKS


def unlock_folder(folder: Path, *, discard: bool = False) -> None:
  """Releases this process's lock on `folder` (nothing if it holds none).

  `discard`: also removes the lock file, and the folders `lock_folder` made
  if nothing else is in them (a run refused, or failing, before it wrote
  anything leaves no folder behind).
  """
  folder = Path(folder).absolute()
  lock, made = _HELD_LOCKS.pop(folder, (None, None))
  if lock is None:
    return
  if discard:
    (folder / LOCK_FILE).unlink(missing_ok=True)
    for path in [folder, *folder.parents] if made is not None else []:
      try:
        path.rmdir()
      except OSError:  # not empty: it holds a run (or was there before)
        break
      if path == made:
        break
  lock.close()  # closing the file releases the flock


def unlock_all_folders() -> None:
  """`unlock_folder(discard=True)` of every folder this process holds (a CLI's runs, when it ends), the last
  locked first (an empty folder made for the first one may hold the later ones)."""
  for folder in reversed(list(_HELD_LOCKS)):
    unlock_folder(folder, discard=True)


def _clear(folder: Path) -> None:
  for name in OUTPUTS:
    path = folder / name
    if path.is_dir():
      shutil.rmtree(path)
    elif path.exists():
      path.unlink()
  for path in folder.glob('events.out.tfevents.*'):
    path.unlink()


def _length(config) -> str:
  return f'--steps={config.steps}' if config.steps is not None else f'--epochs={config.epochs}'


def shorter_than_stored(stored, config) -> bool:
  """Whether `config` asks for fewer epochs (or steps) than the stored run (known before the data loads when both
  count the same unit; in steps against the checkpoint, see `check_resumed_length`, once it has)."""
  if stored.steps is None and config.steps is None:
    return config.epochs < stored.epochs
  if stored.steps is not None and config.steps is not None:
    return config.steps < stored.steps
  return False


def _where(folder: Path, flag: str | None) -> str:
  return f'{flag}={folder}' if flag else str(folder)


def check_folder(folder: Path, config, *, resume: bool, overwrite: bool, flag: str | None = '--workdir') -> bool:
  """Raises `RunDirError` (one line) unless `folder` may take this run as asked; clears it for `overwrite`.

  Returns whether the run continues from the folder's checkpoint. A folder left by this same run before its
  first checkpoint (killed early: config.json, no checkpoint, no summary) is cleared and the run starts again,
  with or without `resume`. `flag` names the folder in messages (None: its path alone).
  """
  where = _where(folder, flag)
  asked = '--resume: ' if flag else ''  # (a study resumes its runs without being asked)
  if folder.exists() and not folder.is_dir():
    raise RunDirError(f'{where} is a file, not a folder: choose a folder.')
  if resume and overwrite:
    raise RunDirError('--resume and --overwrite exclude each other: continue the run, or replace it.')
  stored = _stored_config(folder) if folder.is_dir() else None
  has_checkpoint = (folder / CHECKPOINTS).is_dir() and any((folder / CHECKPOINTS).iterdir())
  if overwrite:
    if folder.is_dir():
      _clear(folder)
    return False
  if has_checkpoint and stored is None:
    raise RunDirError(f'{where} has checkpoints but no {CONFIG_FILE} (deleted?), so the settings of its run are '
                      'unknown: pass --overwrite to start a new run there, or choose another folder.')
  conflicts = resume_conflicts(stored, config) if stored is not None else []
  if stored is not None and not has_checkpoint and not (folder / SUMMARY_FILE).is_file():
    if not conflicts and not shorter_than_stored(stored, config):
      _clear(folder)  # this run, stopped before its first checkpoint: start it again
      return False
  if resume:
    if stored is None or not has_checkpoint:
      raise RunDirError(f'--resume: {where} has no checkpoint to continue; run without --resume to start this run '
                        'there.')
    if conflicts:
      settings = ', '.join(f'{n}={getattr(stored, n)!r} (this command: {getattr(config, n)!r})' for n in conflicts)
      raise RunDirError(f'{asked}{where} holds a run with {settings} in its {CONFIG_FILE}; resume it with its '
                        'settings, or pass --overwrite to replace it.')
    if shorter_than_stored(stored, config):
      raise RunDirError(f'{asked}{where} holds a run of {_length(stored)}; this command asks {_length(config)}, '
                        'shorter: pass --overwrite to train the shorter run afresh, or choose another folder.')
    return True
  if stored is not None or has_checkpoint:
    raise RunDirError(f'{where} already holds run {config_lib.run_id(stored)}: pass --resume to continue it, '
                      '--overwrite to replace it, or choose another folder.')
  return False


def check_resumed_length(folder: Path, done_steps: int, plan, flag: str | None = '--workdir') -> None:
  """After restoring a checkpoint of `done_steps` steps: the run may only go on to equal the uninterrupted run.

  Refused (one line): a run shorter than the checkpoint, and a longer one from a checkpoint that ends inside an
  epoch (the rest of that epoch's shuffled batches would be skipped, so it would not equal an uninterrupted run).
  """
  where = _where(folder, flag)
  asked = '--resume: ' if flag else ''
  if plan.total_steps < done_steps:
    raise RunDirError(f'{asked}{where} holds a checkpoint after {done_steps} steps; this command asks '
                      f'{plan.total_steps}: pass --overwrite to train the shorter run afresh.')
  if plan.total_steps > done_steps and done_steps % plan.steps_per_epoch:
    raise RunDirError(f'{asked}the run in {where} ended inside an epoch (step {done_steps}; epochs are '
                      f'{plan.steps_per_epoch} steps), so a longer run continued from it would not equal an '
                      'uninterrupted one: pass --overwrite to train the longer run, or give lengths in whole epochs.')


class RunFolder:
  """The outputs of one run (or one lane of a sweep group) in `path`; `writer=False` (or no path) writes nothing."""

  def __init__(self, path: Path | None, config, *, writer: bool = True):
    self.path = Path(path) if path is not None else None
    self.config = config
    self.writer = writer and path is not None
    self._tensorboard = None

  def write_config(self, environment: dict[str, Any]) -> None:
    if self.writer:
      self.path.mkdir(parents=True, exist_ok=True)
      storage.write_json_atomic(self.path / CONFIG_FILE, {'config': self.config.to_dict(), 'environment': environment,
                                                          'run_id': config_lib.run_id(self.config)})

  def start_metrics(self, history: list[dict]) -> None:
    """Rewrites metrics.jsonl with the epochs a resumed run keeps (lines after its checkpoint are dropped)."""
    if not self.writer:
      return
    storage.write_text_atomic(self.path / METRICS_FILE, ''.join(json.dumps(m) + '\n' for m in history))
    self._open_tensorboard(len(history))

  def _open_tensorboard(self, epochs_done: int) -> None:
    from tensorboardX import SummaryWriter

    # purge_step: TensorBoard drops the events an interrupted attempt wrote after the checkpoint.
    self._tensorboard = SummaryWriter(str(self.path), purge_step=epochs_done + 1 if epochs_done else None,
                                      flush_secs=30)
    if not epochs_done:
      text = json.dumps(self.config.to_dict(), indent=2, sort_keys=True, default=str)
      self._tensorboard.add_text('config', f'```\n{text}\n```', 0)

  def add_epoch(self, metrics: dict) -> None:
    if not self.writer:
      return
    with open(self.path / METRICS_FILE, 'a') as f:
      f.write(json.dumps(metrics) + '\n')
    if self._tensorboard is not None:
      for name in TENSORBOARD_SCALARS:
        self._tensorboard.add_scalar(name, metrics[name], metrics['epoch'])
      self._tensorboard.flush()

  def history(self) -> list[dict]:
    path = self.path / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

  def write_summary(self, summary: dict) -> None:
    if self.writer:
      storage.write_json_atomic(self.path / SUMMARY_FILE, summary)

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None


# ----------------------------------------------------------------------------
# Checkpoints (Orbax): the whole (possibly stacked) state and the histories.


class Checkpoints:
  """The latest checkpoints of a training state in `folder` (Orbax; the last two are kept)."""

  def __init__(self, folder: Path):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.folder = Path(folder).absolute()
    self.manager = ocp.CheckpointManager(self.folder, options=ocp.CheckpointManagerOptions(max_to_keep=2))

  def restore(self, state, log: Callable[[str], None] = print):
    """`(epoch, state, histories)` of the latest intact checkpoint, or None when there is none at all.

    A checkpoint that can't be read (a truncated array file, a corrupt
    history JSON) is named in one line (`log`), moved out of the way to
    `<folder>-damaged/<epoch>-<time>` (kept for inspection; a later save of
    that epoch must not find it) and the one before it is used.

    Raises:
      RunDirError (one line) when checkpoints exist but none of them is intact.
    """
    ocp = self._ocp
    import jax

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    steps = sorted(self.manager.all_steps(), reverse=True)
    for epoch in steps:
      try:
        restored = self.manager.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()))
        return epoch, restored.state, restored.history['lanes']
      except Exception as error:  # noqa: BLE001  (Orbax, TensorStore and JSON errors alike: the files are damaged)
        if 'tree structures do not match' in str(error):  # intact, but of another layout of the state
          raise RunDirError(f'the checkpoint of epoch {epoch} in {self.folder} holds a state of another layout than '
                            'this run\'s (written by another bnjax version, or other model code): pass --overwrite '
                            'to start the run again.') from None
        where = self._set_aside(epoch)
        reason = ' '.join((str(error).strip().splitlines() or [type(error).__name__])[0].split())[:160]
        log(f'the checkpoint of epoch {epoch} in {self.folder} is damaged ({type(error).__name__}: {reason}); '
            f'moved to {where}' + ('; using the one before it' if epoch != steps[-1] else ''))
    if steps:
      raise RunDirError(f'{self.folder} holds no intact checkpoint (the damaged ones are in {self.folder}-damaged): '
                        'pass --overwrite to start the run again.')
    return None

  def _set_aside(self, epoch: int) -> Path:
    """Moves a damaged checkpoint's folder to `<folder>-damaged/`; returns where it went."""
    import time

    target = self.folder.with_name(self.folder.name + '-damaged') / f'{epoch}-{time.strftime("%Y%m%d-%H%M%S")}'
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
      shutil.move(str(self.folder / str(epoch)), target)
    except FileNotFoundError:  # another process of a multi-process run moved it first
      pass
    self.manager.reload()
    return target

  def resume(self, program, log, what: str = '') -> tuple[int, list[list[dict]] | None]:
    """Puts the latest intact checkpoint's state into `program`: `(epoch, per-lane histories)`, or `(0, None)`.

    Logs `'<what>resumed from the checkpoint of epoch E in <folder>'`.
    """
    restored = self.restore(program.state, log)
    if restored is None:
      return 0, None
    epoch, program.state, histories = restored
    log(f'{what}resumed from the checkpoint of epoch {epoch} in {self.folder}')
    return epoch, histories

  def save(self, epoch: int, state, histories: list[list[dict]]) -> None:
    """Saves and waits; a failed or stopped save leaves no partial checkpoint and the previous ones intact.

    The free space is checked first (twice the state's bytes: Orbax writes a
    temporary copy): Orbax's own failure on a full disk happens in its
    writer threads, which print pages of tracebacks before the error arrives.
    Orbax writes into a temporary folder and renames it when complete, and
    removes older checkpoints only after that; a Ctrl-C or SIGTERM during
    the save takes effect once it is complete (`signals.deferred`).
    """
    import jax

    ocp = self._ocp
    need = 2 * sum(getattr(leaf, 'nbytes', 0) for leaf in jax.tree.leaves(state)) + (1 << 20)
    free = shutil.disk_usage(self.folder if self.folder.exists() else self.folder.parent).free
    if free < need:
      raise OSError(errno.ENOSPC, f'no room for a checkpoint of {need / 2**20:.1f} MiB ({free / 2**20:.1f} MiB free)',
                    str(self.folder))
    with signals.deferred():
      try:
        self.manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         history=ocp.args.JsonSave({'lanes': histories})))
        self.manager.wait_until_finished()
      except BaseException:
        for partial in self.folder.glob('*.orbax-checkpoint-tmp*'):
          shutil.rmtree(partial, ignore_errors=True)
        raise

  def close(self) -> None:
    self.manager.close()


def remove_tree(path: Path) -> None:
  if Path(path).exists():
    shutil.rmtree(path, ignore_errors=True)
