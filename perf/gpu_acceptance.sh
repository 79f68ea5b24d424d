#!/usr/bin/env bash
# GPU acceptance (issue 14): bash perf/gpu_acceptance.sh [--dry-run] [--output FILE]. See perf/gpu_acceptance.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" perf/gpu_acceptance.py "$@"
