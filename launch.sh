#!/usr/bin/env bash
# bnjax launcher. Creates .venv and installs bnjax on first use (again when pyproject.toml changes).
#
#   ./launch.sh mnist_plain_vs_bn [flags]   the main job: MNIST MLP, plain vs BN (the source's study)
#   ./launch.sh STUDY [flags]     any named study: a file of bnjax/lab/studies/ (the source's comparisons, the
#                                 sweeps, the reproductions of docs/results.md); --budget=full for the source's
#   ./launch.sh repro_all         every reproduction of docs/results.md, one after another
#   ./launch.sh list              the studies, with their settings
#   ./launch.sh train [flags]     any single experiment: experiments/train.py with your flags
#                                 (--model=resnet20: its recipe; --model=package.module:build: your own model)
#   ./launch.sh sweep [flags]     any grid: experiments/sweep.py --momentum=0.9,0.99 --seed=0,1 ...
#   ./launch.sh report CSV        rebuild a sweep's report.md from its results.csv
#   ./launch.sh demo              the functional API in a few lines
#   ./launch.sh test [args]       the test suite (pytest args pass through)
#
# Data: the real MNIST/CIFAR-10 files are used where they are found (--data_dir, $BNJAX_DATA_DIR,
# or ../shared/data beside this checkout); elsewhere TFDS downloads them.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${BNJAX_VENV:-.venv}

ensure_venv() {
  local stamp="$VENV/.bnjax-installed" want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
  fi
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
  fi
}

# The data folder to pass, if the user named none: ../shared/data where it exists.
data_flags() {
  if [[ -z "${BNJAX_DATA_DIR:-}" && -d ../shared/data ]] && ! printf '%s\n' "$@" | grep -q -- '^--data_dir='; then
    echo "--data_dir=$(cd ../shared/data && pwd)"
  fi
}

job=${1:-help}
shift || true
case "$job" in
  test)
    ensure_venv
    exec "$VENV/bin/python" -m pytest -n 2 --dist worksteal "$@"
    ;;
  train)
    ensure_venv
    exec "$VENV/bin/python" experiments/train.py $(data_flags "$@") "$@"
    ;;
  sweep)
    ensure_venv
    exec "$VENV/bin/python" experiments/sweep.py $(data_flags "$@") "$@"
    ;;
  report)
    ensure_venv
    exec "$VENV/bin/python" experiments/report.py "$@"
    ;;
  demo)
    ensure_venv
    exec "$VENV/bin/python" experiments/demo.py "$@"
    ;;
  list)
    ensure_venv
    exec "$VENV/bin/python" experiments/study.py --list
    ;;
  help|-h|--help)
    sed -n '2,17p' "$0"
    ;;
  *)
    # A named study (or repro_all); experiments/study.py says in one line if there is none.
    ensure_venv
    exec "$VENV/bin/python" experiments/study.py --study="$job" $(data_flags "$@") "$@"
    ;;
esac
