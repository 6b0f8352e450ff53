r"""The reproductions of docs/results.md (old entry point: the same as experiments/study.py --study=repro_NAME).

    python experiments/repro.py --study=seed000                  # = experiments/study.py --study=repro_seed000
    python experiments/repro.py --study=renorm --budget=full --epochs=10
"""

import importlib.util
import sys
from pathlib import Path

if __name__ == '__main__':
  sys.argv = [a if not a.startswith('--study=') or a == '--study=all' else f'--study=repro_{a[len("--study="):]}'
              for a in sys.argv]
  spec = importlib.util.spec_from_file_location('study', Path(__file__).with_name('study.py'))
  study = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(study)
  study.cli.run(study.main)
