"""Peak dense FLOP rates of accelerators, for model-FLOPs utilization (MFU) and speed estimates.

Per chip, bfloat16 matmul peak as the vendors publish it. A TPU v2/v3/v4/v5p chip has two
TensorCores; JAX shows one device per core on v2/v3 and one per chip (megacore) on v4/v5p; v5e
and v6e chips have one core each.
"""

import jax

# jax.devices()[0].device_kind -> (peak FLOP/s per chip, JAX devices per chip)
PEAK_FLOPS_PER_CHIP = {
  'TPU v2': (45e12, 2),
  'TPU v3': (123e12, 2),
  'TPU v4': (275e12, 1),
  'TPU v5 lite': (197e12, 1),
  'TPU v5e': (197e12, 1),
  'TPU v5': (459e12, 1),
  'TPU v5p': (459e12, 1),
  'TPU v6 lite': (918e12, 1),
  'TPU v6e': (918e12, 1),
  'NVIDIA H100 80GB HBM3': (989e12, 1),
  'NVIDIA A100-SXM4-80GB': (312e12, 1),
  'NVIDIA A100-SXM4-40GB': (312e12, 1),
}


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """The peak FLOP/s of one JAX device of this kind, or None if the kind is not in the table."""
  device = jax.devices()[0] if device is None else device
  entry = PEAK_FLOPS_PER_CHIP.get(device.device_kind)
  return None if entry is None else entry[0] / entry[1]
