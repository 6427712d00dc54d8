#!/usr/bin/env bash
# Creates .venv with the pinned stack and this package (editable), once per requirements.txt.
# Needs only Python 3.11 on PATH (python3.11, or python3 if that is 3.11).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp=.venv/.installed-$(sha1sum requirements.txt setup.cfg | sha1sum | cut -c1-12)
if [[ ! -f $stamp ]]; then
  "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is needed, found {sys.version}; set PYTHON=/path/to/python3.11"'
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements.txt
  .venv/bin/python -m pip install --quiet --no-deps -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
