#!/usr/bin/env bash
# Sets up .venv if needed, checks the house style (ruff), then runs the whole test suite
# (slow end-to-end tests included). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
.venv/bin/ruff format --check --quiet . || { echo 'style: run .venv/bin/ruff format .' >&2; exit 1; }
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest tests "$@"
