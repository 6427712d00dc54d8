#!/usr/bin/env bash
# Sets up .venv if needed, then trains the embedded default (scikit-learn's digits) on this machine.
# Samples: workdirs/digits/samples/*.png; metrics: workdirs/digits/eval/; re-running resumes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
venv=${VENV:-.venv}
export TF_CPP_MIN_LOG_LEVEL=2
exec "$venv/bin/python" -m diffusion_jax.main --config=configs/digits.py \
    --workdir="${WORKDIR:-workdirs/digits}" --config.dataset.data_dir="${TFDS_DATA_DIR:-data/tensorflow_datasets}" "$@"
