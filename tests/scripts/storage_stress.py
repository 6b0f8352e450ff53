"""Processes that race on shared files, for tests/test_storage.py (one role per run).

    storage_stress.py write PATH COUNT WRITER START  # from time START, write_json_atomic(PATH) COUNT times
    storage_stress.py read PATH STOP            # read PATH until the file STOP exists; every read must be whole
    storage_stress.py claim PATH STALE_AFTER START OWNER  # at time START, claim PATH once; print won/lost
    storage_stress.py hold PATH STALE_AFTER     # claim PATH, heartbeat, print 'claimed', wait to be killed
    storage_stress.py imports                   # print the modules storage imports that are not standard

Loads bnjax/lab/storage.py by its path, not through `bnjax` (whose core
imports jax), so each process starts in a few tens of milliseconds. Exits
non-zero, printing why, on the first failure.
"""

import importlib.util
import json
import sys
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / 'bnjax' / 'lab' / 'storage.py'
PAYLOAD = 'x' * 3000  # several pages' worth, so that a torn file would show


def load_storage():
  spec = importlib.util.spec_from_file_location('storage', SOURCE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def record(writer: str, i: int) -> dict:
  return {'writer': writer, 'i': i, 'payload': PAYLOAD, 'tail': [writer, i]}


def write(storage, path: str, count: str, writer: str, start: str = '0') -> None:
  while time.time() < float(start):  # a barrier: the writers overlap from their first write
    pass
  for i in range(int(count)):
    storage.write_json_atomic(path, record(writer, i))
  print(f'wrote {count}')


def read(storage, path: str, stop: str) -> None:
  reads = 0
  while not Path(stop).exists():
    with open(path, 'rb') as f:  # a fresh open per read, as any reader of the sweep folder would
      text = f.read().decode('utf-8')
    value = json.loads(text)
    want = record(value['writer'], value['i'])
    if value != want or text != storage.json_text(want):
      sys.exit(f'torn read after {reads} reads: {text[:80]!r}...{text[-80:]!r}')
    reads += 1
  print(f'read {reads}')


def claim(storage, path: str, stale_after: str, start: str, owner: str) -> None:
  while time.time() < float(start):  # a barrier: every racer tries at the same moment
    pass
  won = storage.claim(path, owner=owner, stale_after=float(stale_after))
  print('won' if won is not None else 'lost')


def hold(storage, path: str, stale_after: str) -> None:
  held = storage.claim(path, owner='holder', stale_after=float(stale_after))
  if held is None:
    sys.exit('could not claim')
  with held:
    print('claimed', flush=True)
    time.sleep(600)


def imports(storage) -> None:
  del storage
  print(' '.join(sorted(name for name in sys.modules if name.split('.')[0] in ('jax', 'jaxlib', 'flax', 'numpy'))))


if __name__ == '__main__':
  role, *args = sys.argv[1:]
  globals()[role](load_storage(), *args)
