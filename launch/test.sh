#!/usr/bin/env bash
# Sets up the venv if needed (with the TPU runtime: tests compile for TPU topologies), checks the
# house style (ruff), then runs the whole test suite (slow end-to-end tests included) in one
# pytest-xdist worker per core (a test file stays on one worker: its module fixtures are built
# once; files in the suite's order, the end-to-end ones first: tests/conftest.py). Extra arguments go to pytest: `-m stack` is the subset CI runs on the other Pythons.
#   PYTHON=python3.12 VENV=.venv-py3.12 bash launch/test.sh -m stack
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WITH_TPU=1 bash launch/setup.sh
venv=${VENV:-.venv}
"$venv/bin/ruff" format --check --quiet . || { echo "style: run $venv/bin/ruff format ." >&2; exit 1; }
"$venv/bin/ruff" check --quiet .
exec "$venv/bin/python" -m pytest tests --numprocesses=auto --dist=loadfile --no-loadscope-reorder "$@"
