"""Which accelerator this machine has, asked of the operating system alone (standard library only,
no JAX): ``runtime``'s guard against a silent fall-back to the CPU, the notebook's install cell
(before anything is installed) and ``launch/tpu.sh`` (``python3 diffusion_jax/accelerator.py``).

TPU chips appear as ``/dev/accel*`` (v2, v3, v4, v5p) or as ``/dev/vfio/<n>`` (v5e, v6e, TPU7x);
a TPU host may also name its slice in ``TPU_ACCELERATOR_TYPE`` (Colab's TPU runtime, GKE's TPU
nodes). NVIDIA GPUs appear as ``/dev/nvidia<n>``.
"""

from __future__ import annotations

import glob
import os
import sys

TPU_DEVICE_GLOBS = ('/dev/accel*', '/dev/vfio/[0-9]*')
GPU_DEVICE_GLOBS = ('/dev/nvidia[0-9]*',)
TPU_ENV = 'TPU_ACCELERATOR_TYPE'


def tpu_chips() -> list[str]:
  """The device files of this host's TPU chips (empty on a host without any)."""
  return sorted(path for pattern in TPU_DEVICE_GLOBS for path in glob.glob(pattern))


def has_tpu() -> bool:
  """Whether this host has TPU chips (device files, or a TPU host's environment)."""
  return bool(tpu_chips() or os.environ.get(TPU_ENV))


def has_gpu() -> bool:
  """Whether this host has NVIDIA GPUs."""
  return any(glob.glob(pattern) for pattern in GPU_DEVICE_GLOBS)


def kind() -> str:
  """``'tpu'``, ``'gpu'`` or ``'cpu'``: the accelerator this host has (a TPU first)."""
  return 'tpu' if has_tpu() else 'gpu' if has_gpu() else 'cpu'


if __name__ == '__main__':
  # `accelerator.py`: tpu, gpu or cpu; `accelerator.py --tpu-chips`: the chips' device files.
  print(' '.join(tpu_chips()) if sys.argv[1:] == ['--tpu-chips'] else kind())
