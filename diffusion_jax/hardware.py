"""Accelerator chips (peak dense FLOP rate, HBM), model-FLOPs utilization (MFU), and XLA's FLOP
counts.

Per chip, as the vendors publish them: the bfloat16 dense peak and the HBM. A TPU v2, v3 and TPU7x
chip has two TensorCores and JAX shows one device per core; v4 and v5p chips have two cores that
JAX shows as one device (megacore); v5e and v6e chips have one core each. A CPU has no entry: its
peak depends on the model, clock and core count, so on a CPU the loop reports the achieved FLOP
rate (``train/flops_per_second``) instead of an MFU.

In the loop (``seconds_per_step`` measured between two metric writes):

  lowered = step_fn.lower(state, batch, metrics)  # once: counted, then compiled
  flops = hardware.lowered_flops(lowered, mesh=mesh) / steps_per_call
  step_fn = lowered.compile()
  writer.write_scalars(step, hardware.throughput_metrics(flops, seconds_per_step))
"""

import dataclasses
from typing import Any

import jax

from diffusion_jax.errors import SetupError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip: its bfloat16 dense peak, its HBM and the JAX devices it shows."""

  peak_flops: float  # FLOP/s
  hbm_bytes: int
  devices: int

  @property
  def hbm_bytes_per_device(self) -> int:
    return self.hbm_bytes // self.devices


_V5E, _V5P, _V6E = Chip(197e12, 16 * GiB, 1), Chip(459e12, 95 * GiB, 1), Chip(918e12, 32 * GiB, 1)
# jax.devices()[0].device_kind -> its chip (Cloud TPU's system architecture pages; NVIDIA's specs).
CHIPS = {
  'TPU v2': Chip(45e12, 16 * GiB, 2),
  'TPU v3': Chip(123e12, 32 * GiB, 2),
  'TPU v4': Chip(275e12, 32 * GiB, 1),
  'TPU v5 lite': _V5E,
  'TPU v5e': _V5E,
  'TPU v5': _V5P,
  'TPU v5p': _V5P,
  'TPU v6 lite': _V6E,
  'TPU v6e': _V6E,
  'TPU7x': Chip(2307e12, 192 * GiB, 2),
  'NVIDIA H100 80GB HBM3': Chip(989e12, 80 * GiB, 1),
  'NVIDIA A100-SXM4-80GB': Chip(312e12, 80 * GiB, 1),
  'NVIDIA A100-SXM4-40GB': Chip(312e12, 40 * GiB, 1),
}


def chip(device: jax.Device | None = None) -> Chip | None:
  """The chip of a JAX device (default: the first), or None if its kind is not in ``CHIPS``."""
  return CHIPS.get((jax.devices()[0] if device is None else device).device_kind)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """The peak FLOP/s of one JAX device of this kind, or None if the kind is not in the table."""
  entry = chip(device)
  return None if entry is None else entry.peak_flops / entry.devices


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


def compiled_bytes(compiled: jax.stages.Compiled) -> int:
  """Device memory one call of a compiled program needs on each device, by XLA's memory analysis:
  arguments + outputs − the outputs that reuse donated arguments + temporaries + its code."""
  m = compiled.memory_analysis()
  return (
    m.argument_size_in_bytes
    + m.output_size_in_bytes
    - m.alias_size_in_bytes
    + m.temp_size_in_bytes
    + m.generated_code_size_in_bytes
  )


def device_bytes_limit(device: jax.Device) -> int | None:
  """The memory JAX may use on ``device`` (``memory_stats()['bytes_limit']``; None on a CPU)."""
  stats = device.memory_stats()
  return None if not stats else stats.get('bytes_limit')


def check_fits(compiled: jax.stages.Compiled, device: jax.Device, *, what: str, fix: str) -> None:
  """A SetupError, before the program first runs, if ``compiled`` needs more memory per device
  than ``device`` has for JAX (a no-op where JAX reports no limit: a CPU)."""
  limit = device_bytes_limit(device)
  needed = compiled_bytes(compiled)
  if limit is not None and needed > limit:
    raise SetupError(
      f"{what} needs {needed / GiB:.2f} GiB per device (XLA's memory analysis of the compiled "
      f'program), more than the {limit / GiB:.2f} GiB JAX has on each {device.device_kind}: it '
      f'would fail with RESOURCE_EXHAUSTED. {fix}'
    )


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """A Cloud TPU accelerator type as XLA:TPU compiles for it without the hardware:
  ``jax.experimental.topologies.get_topology_desc(topology, platform='tpu', **kwargs)``."""

  topology: str  # e.g. 'v4:2x2x2'
  chips_per_host: tuple[int, int, int]  # the chips of one host (VM) along the topology
  megacore: bool = False  # v4, v5p: both cores of a chip as one JAX device

  def topology_kwargs(self) -> dict[str, Any]:
    return dict(
      chip_config_name='megacore' if self.megacore else 'default',
      chips_per_host_bounds=self.chips_per_host,
    )


# Accelerator type (gcloud's --accelerator-type; GKE's for TPU7x) -> how to compile for it.
TPU_SLICES = {
  'v2-8': TpuSlice('v2:2x2', (2, 2, 1)),
  'v3-8': TpuSlice('v3:2x2', (2, 2, 1)),
  'v3-32': TpuSlice('v3:4x4', (2, 2, 1)),
  'v4-8': TpuSlice('v4:2x2x1', (2, 2, 1), megacore=True),
  'v4-16': TpuSlice('v4:2x2x2', (2, 2, 1), megacore=True),
  'v4-32': TpuSlice('v4:2x2x4', (2, 2, 1), megacore=True),
  'v5litepod-1': TpuSlice('v5e:1x1', (1, 1, 1)),
  'v5litepod-4': TpuSlice('v5e:2x2', (2, 2, 1)),
  'v5litepod-8': TpuSlice('v5e:2x4', (2, 4, 1)),
  'v5litepod-16': TpuSlice('v5e:4x4', (2, 2, 1)),
  'v5p-8': TpuSlice('v5:2x2x1', (2, 2, 1), megacore=True),
  'v5p-16': TpuSlice('v5:2x2x2', (2, 2, 1), megacore=True),
  'v6e-8': TpuSlice('v6e:2x4', (2, 4, 1)),
  'v6e-16': TpuSlice('v6e:4x4', (2, 2, 1)),
  'tpu7x-8': TpuSlice('tpu7x:2x2x1', (2, 2, 1)),
  'tpu7x-16': TpuSlice('tpu7x:2x2x2', (2, 2, 1)),
}
