#!/usr/bin/env bash
# Runs a config on every host of a Cloud TPU VM slice (v3-8 or a multi-host pod slice).
# Usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG GS_WORKDIR GS_DATA_DIR [--config.x=y ...]
set -euo pipefail
tpu=$1 zone=$2 config=$3 workdir=$4 data_dir=$5
shift 5
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e
  cd ~/diffusion_jax || { git clone \$REPO_URL ~/diffusion_jax && cd ~/diffusion_jax; }
  python3 -m pip install -q -r requirements.txt && python3 -m pip install -q --no-deps -e .
  python3 -m pip install -q -U 'jax[tpu]==0.10.2' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  TF_CPP_MIN_LOG_LEVEL=2 python3 -m diffusion_jax.main --config=$config --workdir=$workdir \
      --config.dataset.data_dir=$data_dir --distributed $*"
