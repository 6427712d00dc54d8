#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole test suite (slow end-to-end tests included).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
exec .venv/bin/python -m pytest tests "$@"
