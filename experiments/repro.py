r"""The reproductions of docs/results.md (old entry point: the same as experiments/study.py --study=repro_NAME).

    python experiments/repro.py --study=seed000                  # = experiments/study.py --study=repro_seed000
    python experiments/repro.py --study=renorm --budget=full --epochs=10
"""

import runpy
import sys
from pathlib import Path

if __name__ == '__main__':
  sys.argv = [a if not a.startswith('--study=') or a == '--study=all' else f'--study=repro_{a[len("--study="):]}'
              for a in sys.argv]
  runpy.run_path(str(Path(__file__).with_name('study.py')), run_name='__main__')
