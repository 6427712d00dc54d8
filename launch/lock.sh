#!/usr/bin/env bash
# Regenerates the lock files from setup.cfg (the package with its `tpu` and `test` extras): every
# package at the newest release that resolves with the rest for that Python, on Linux x86-64.
#   requirements.txt        Python 3.12 and 3.13, the main line (the newest jax and libtpu)
#   requirements-py311.txt  Python 3.11 (jax 0.10.2 is the last jax with 3.11 wheels)
# Run it to move the pins forward, then the whole suite (bash launch/test.sh) on each Python.
# Needs only a Python with pip; uv (the resolver) is installed into a temporary venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
UV_PIN=${UV_PIN:-$(sed -n "s/^uv==\([^[:space:]]*\).*/\1/p" requirements.txt)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet "uv==$UV_PIN"

# lock PYTHON_VERSION OUTPUT NOTES: the resolution for that Python, with NOTES (why pins are held
# back) in front of uv's own header.
lock() {
  local version=$1 output=$2 notes=$3
  # manylinux_2_31: libtpu's wheels need glibc 2.31 (Ubuntu 20.04+, Debian 11+, Colab, TPU VMs).
  "$tmp/venv/bin/uv" pip compile setup.cfg --extra tpu --extra test --upgrade --quiet \
    --python-version "$version" --python-platform x86_64-manylinux_2_31 \
    --custom-compile-command 'bash launch/lock.sh' -o "$tmp/lock.txt"
  {
    printf '# Exact pins of the whole stack for Python %s on Linux x86-64, made by launch/lock.sh.\n' "$version"
    printf '# launch/setup.sh installs them all except libtpu (only where a TPU is, or with WITH_TPU=1).\n'
    printf '%s\n' "$notes"
    cat "$tmp/lock.txt"
  } > "$output"
  echo "$output: $(grep -c '^[a-z]' "$output") packages for Python $version"
}

lock 3.12 requirements.txt "# Also Python 3.13 (the same resolution). Held back: libtpu (0.0.52 is out; jax 0.12.0.1,
# the newest jax, asks for libtpu 0.0.50.*)."
lock 3.11 requirements-py311.txt "# Held back by Python 3.11: jax and jaxlib 0.10.2 (the last with 3.11 wheels), libtpu
# 0.0.42.1 (what jax 0.10.2 asks for; later libtpu has no 3.11 wheels), flax 0.12.8, numpy 2.4.6
# and scipy 1.17.1 (their next releases need Python 3.12). The newest TPU (TPU7x) needs the main
# line: this lock is kept while it costs nothing to keep (the same code runs on both)."
