#!/usr/bin/env bash
# bnjax launcher: sets up .venv on first use, then runs a named job.
#   ./launch.sh demo            the main job (see README)
#   ./launch.sh test [pytest args]
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${BNJAX_VENV:-.venv}

ensure_venv() {
  # Re-install when pyproject.toml changes; the stamp holds its hash.
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

job=${1:-help}
shift || true
case "$job" in
  test)
    ensure_venv
    exec "$VENV/bin/python" -m pytest -n 2 "$@"
    ;;
  demo)
    ensure_venv
    exec "$VENV/bin/python" experiments/demo.py "$@"
    ;;
  *)
    sed -n '2,5p' "$0"
    exit 2
    ;;
esac
