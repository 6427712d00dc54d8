"""Peak dense FLOP rates of accelerators, model-FLOPs utilization (MFU), and XLA's FLOP counts.

Per chip, bfloat16 matmul peak as the vendors publish it. A TPU v2/v3/v4/v5p chip has two
TensorCores; JAX shows one device per core on v2/v3 and one per chip (megacore) on v4/v5p; v5e
and v6e chips have one core each. A CPU has no entry: its peak depends on the model, clock and
core count, so on a CPU the loop reports the achieved FLOP rate (``train/flops_per_second``)
instead of an MFU.

In the loop (``seconds_per_step`` measured between two metric writes):

  lowered = step_fn.lower(state, batch, metrics)  # once: counted, then compiled
  flops = hardware.lowered_flops(lowered, mesh=mesh) / steps_per_call
  step_fn = lowered.compile()
  writer.write_scalars(step, hardware.throughput_metrics(flops, seconds_per_step))
"""

from typing import Any

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


def train_mfu(
  flops_per_step: float,
  seconds_per_step: float,
  device_count: int | None = None,
  device: jax.Device | None = None,
) -> float | None:
  """Model-FLOPs utilization: achieved FLOP/s over the peak of ``device_count`` devices (default:
  all) of ``device``'s kind (default: the first device's); None if that kind's peak is unknown
  (a CPU). ``flops_per_step`` counts the whole global step (all devices)."""
  peak = peak_flops_per_device(device)
  if peak is None or seconds_per_step <= 0:
    return None
  device_count = jax.device_count() if device_count is None else device_count
  return flops_per_step / seconds_per_step / (peak * device_count)


def throughput_metrics(
  flops_per_step: float,
  seconds_per_step: float,
  device_count: int | None = None,
  device: jax.Device | None = None,
) -> dict[str, float]:
  """``{'train/flops_per_second': ..., 'train/mfu': ...}`` for the metric writer; ``train/mfu``
  only where the device kind's peak is known (never on a CPU)."""
  metrics = {'train/flops_per_second': flops_per_step / seconds_per_step}
  mfu = train_mfu(flops_per_step, seconds_per_step, device_count, device)
  if mfu is not None:
    metrics['train/mfu'] = mfu
  return metrics


def step_flops(jitted: Any, *args: Any, mesh: Any = None) -> float:
  """FLOPs of one call ``jitted(*args)`` over all devices: XLA's cost analysis of the lowered
  program (traced and lowered, not compiled; ``args`` may be ``jax.ShapeDtypeStruct``s).

  A ``shard_map`` program (``train_step``, ``sampling``) is written per device, and XLA counts
  one device's share: pass its ``mesh`` to multiply by the device count. A program of global
  shapes (plain ``jit``) needs no mesh. Divide by ``train.steps_per_call`` for one optimizer step.
  """
  return lowered_flops(jitted.lower(*args), mesh=mesh)


def lowered_flops(lowered: jax.stages.Lowered, *, mesh: Any = None) -> float:
  """``step_flops`` of a program already lowered (one that is compiled from ``lowered`` next)."""
  return float(lowered.cost_analysis()['flops']) * (1 if mesh is None else mesh.size)
