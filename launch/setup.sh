#!/usr/bin/env bash
# Creates .venv (or $VENV) with the pinned stack and this package (editable), once per lock file.
# Python: $PYTHON if set, else the newest of python3.13, python3.12 and python3.11 found on PATH
# (pyenv's versions too). The lock: requirements.txt on 3.12 and 3.13, requirements-py311.txt on
# 3.11. libtpu (the TPU runtime) only with WITH_TPU=1. An existing venv is kept while its Python
# is supported and matches $PYTHON (when set); otherwise it is made again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=${VENV:-.venv}
SUPPORTED='3.11, 3.12 and 3.13'

# The Python's "major.minor" if it runs and is supported (status 1 otherwise).
supported_version() {
  "$1" -c 'import sys; v = sys.version_info[:2]; print("%d.%d" % v); sys.exit(not (3, 11) <= v <= (3, 13))' 2>/dev/null
}

# Every way to reach a command: itself, then pyenv's interpreters of that name (not on PATH
# unless selected).
candidates() {
  local name=$1 version
  printf '%s\n' "$name"
  if [[ $name != */* ]] && command -v pyenv > /dev/null; then
    for version in $(pyenv whence "$name" 2> /dev/null); do
      printf '%s\n' "$(pyenv root)/versions/$version/bin/$name"
    done
  fi
}

# The interpreter to use: $PYTHON (resolved through pyenv if needed), else the newest supported.
find_python() {
  local name path
  for name in ${PYTHON:-python3.13 python3.12 python3.11 python3}; do
    while read -r path; do
      if supported_version "$path" > /dev/null; then
        command -v "$path"
        return
      fi
    done < <(candidates "$name")
  done
  if [[ -n ${PYTHON:-} ]]; then
    echo "setup: PYTHON=$PYTHON does not run a supported Python ($SUPPORTED)." >&2
  else
    echo "setup: no Python $SUPPORTED found (python3.13, python3.12, python3.11, python3);" \
      "install one, or set PYTHON=/path/to/python3.12." >&2
  fi
  exit 1
}

current=$(supported_version "$venv/bin/python" || true)
if [[ -z ${PYTHON:-} && -n $current ]]; then
  python=$venv/bin/python version=$current  # keep the venv's Python
else
  python=$(find_python)
  version=$(supported_version "$python")
fi
lock=requirements.txt
[[ $version != 3.11 ]] || lock=requirements-py311.txt
tpu=${WITH_TPU:-0}
stamp=$venv/.installed-$(cat "$lock" setup.cfg <(echo "$version tpu=$tpu") | sha1sum | cut -c1-12)
[[ ! -f $stamp ]] || exit 0
if [[ $current != "$version" ]]; then
  rm -rf "$venv"
  echo "setup: $venv with Python $version ($python) and the pins of $lock" >&2
  "$python" -m venv "$venv"
else
  echo "setup: $venv (Python $version) to the pins of $lock" >&2
fi
# uv installs the ~140 pins in well under a minute (pip: several); it comes at the lock's version.
uv_pin=$(sed -n 's/^uv==\([^[:space:]]*\).*/\1/p' "$lock")
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$uv_pin"
pins=$venv/.pins.txt
if ((tpu)); then cp "$lock" "$pins"; else grep -v '^libtpu==' "$lock" > "$pins"; fi
"$venv/bin/uv" pip install --quiet --python "$venv/bin/python" -r "$pins"
"$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --no-deps -e .
rm -f "$venv"/.installed-* "$pins"
touch "$stamp"
