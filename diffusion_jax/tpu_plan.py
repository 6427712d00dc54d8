"""What a run needs on a Cloud TPU slice that is not here: every device program the loop runs,
compiled by XLA:TPU on this host (deviceless ahead-of-time compilation with libtpu), with its
memory per device against the chip's HBM, its FLOPs and XLA's estimate of its time.

  plan = tpu_plan.plan(config, 'v3-8')   # needs the TPU runtime: WITH_TPU=1 bash launch/setup.sh
  plan.fits, plan.train.steps_per_second, plan.train.mfu

The programs: the train step (at the config's batch and ``train.steps_per_call``, 10 on a TPU by
default), the sample grid's sampler, and each in-loop evaluator's programs (its sampler chunk, the
Inception forward, the bound). XLA's times are its cost model's lower bounds
(``optimal_seconds``), not measurements.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import hardware, train_step
from diffusion_jax.errors import SetupError
from diffusion_jax.evaluators.registry import TYPES
from diffusion_jax.run import Run

TPU_STEPS_PER_CALL = 10  # train.steps_per_call=None on a TPU (runtime.steps_per_call)
# XLA:TPU's refusal of a program that does not fit: "... required for HLO temporaries (128.60G)
# exceeds available HBM (15.75G)". Its G are GiB.
_OUT_OF_MEMORY = re.compile(r'required for [^(]*\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)')
GiB_FROM_XLA = 2**30


@dataclasses.dataclass(frozen=True)
class Compiled:
  """One program as XLA:TPU compiled it: per device memory and FLOPs, XLA's time estimate."""

  name: str
  bytes_per_device: int
  flops_per_device: float
  optimal_seconds: float | None
  compile_seconds: float
  calls_per_step: float = 1.0  # the train step: 1 / steps_per_call
  out_of_memory: str | None = None  # XLA:TPU's refusal when it does not fit (then no FLOPs)

  def fits(self, hbm_bytes: int) -> bool:
    return self.out_of_memory is None and self.bytes_per_device <= hbm_bytes


@dataclasses.dataclass(frozen=True)
class Plan:
  """The compiled programs of one config on one TPU slice."""

  tpu: str
  device_kind: str
  num_devices: int
  num_hosts: int
  hbm_bytes_per_device: int
  peak_flops_per_device: float
  programs: tuple[Compiled, ...]

  @property
  def train(self) -> Compiled:
    return self.programs[0]

  @property
  def fits(self) -> bool:
    return all(p.fits(self.hbm_bytes_per_device) for p in self.programs)

  @property
  def largest(self) -> Compiled:
    return max(self.programs, key=lambda p: p.bytes_per_device)

  @property
  def step_seconds(self) -> float | None:
    """XLA's estimate of one optimizer step's time (a lower bound)."""
    seconds = self.train.optimal_seconds
    return None if seconds is None else seconds * self.train.calls_per_step

  @property
  def mfu(self) -> float | None:
    """The model-FLOPs utilization XLA's estimate implies."""
    seconds = self.step_seconds
    if not seconds:
      return None
    return (
      self.train.flops_per_device * self.train.calls_per_step / seconds / self.peak_flops_per_device
    )


def topology_devices(tpu: str) -> list[jax.Device]:
  """The devices of an accelerator type (``hardware.TPU_SLICES``), described by libtpu."""
  if tpu not in hardware.TPU_SLICES:
    raise SetupError(
      f'--tpu={tpu} is not a TPU type this plan knows; choose one of '
      f'{", ".join(hardware.TPU_SLICES)} (or add it to hardware.TPU_SLICES).'
    )
  # This host is no TPU host: libtpu is to ask nothing of its (absent) metadata server, and may
  # be loaded by several processes at once (it compiles only; nothing holds a chip).
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies

  slice_ = hardware.TPU_SLICES[tpu]
  try:
    return list(
      topologies.get_topology_desc(
        slice_.topology, platform='tpu', **slice_.topology_kwargs()
      ).devices
    )
  except Exception as e:  # noqa: BLE001  (libtpu absent, or too old for the generation)
    raise SetupError(
      f'XLA:TPU cannot describe a {tpu} here ({type(e).__name__}: {str(e)[:200]}). Compiling for '
      'a TPU needs the TPU runtime (libtpu, Linux x86-64): WITH_TPU=1 bash launch/setup.sh; '
      'TPU7x needs the main line (Python 3.12 or 3.13).'
    ) from None


def compile_program(
  name: str, fn: Any, args: tuple[Any, ...], calls_per_step: float = 1.0
) -> Compiled:
  """``fn`` lowered with abstract ``args`` and compiled; its XLA:TPU figures per device. A
  program too big for the chip is one XLA:TPU refuses to compile: it comes back with the refusal
  and the memory XLA says it needs (its temporaries alone)."""
  start = time.perf_counter()
  # Nothing goes into the persistent compilation cache: with no TPU client, JAX could not load
  # the entry back (it warns when a later compile finds one).
  threshold = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_persistent_cache_min_compile_time_secs', float('inf'))
  try:
    compiled = fn.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    match = _OUT_OF_MEMORY.search(str(e))
    if match is None:
      raise
    return Compiled(
      name=name,
      bytes_per_device=int(float(match[1]) * GiB_FROM_XLA),
      flops_per_device=0.0,
      optimal_seconds=None,
      compile_seconds=time.perf_counter() - start,
      calls_per_step=calls_per_step,
      out_of_memory=match[0],
    )
  finally:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', threshold)
  cost = compiled.cost_analysis() or {}
  return Compiled(
    name=name,
    bytes_per_device=hardware.compiled_bytes(compiled),
    flops_per_device=float(cost.get('flops', 0.0)),
    optimal_seconds=_positive(cost.get('optimal_seconds')),
    compile_seconds=time.perf_counter() - start,
    calls_per_step=calls_per_step,
  )


def _positive(seconds: float | None) -> float | None:
  """XLA's estimate where it gives one (its cost model returns nonsense, < 0, for some programs)."""
  return seconds if seconds is not None and seconds > 0 else None


def plan(config: ml_collections.ConfigDict, tpu: str, *, train_only: bool = False) -> Plan:
  """Every device program of ``config``'s run on ``tpu``, compiled; ``train_only``: the train
  step alone (to try settings that would make it fit)."""
  devices = topology_devices(tpu)
  run = Run.create(config, devices=devices)
  k = config.train.steps_per_call or TPU_STEPS_PER_CALL
  batch = run.abstract_batch(config.train.batch_size, k)
  step = train_step.make_train_step(run)
  labels = run.abstract_labels(config.train.batch_size, k)
  args = (run.abstract_state(), batch, train_step.abstract_metrics(run.mesh), labels)
  programs = [compile_program('train step', step, args, calls_per_step=1 / k)]
  if not train_only:
    grid = run.sample_fn(config.train.num_sample_images)
    grid_args = (args[0].ema_params, run.abstract_key(), jax.ShapeDtypeStruct((), jnp.int32))
    programs.append(compile_program('sample grid', grid, grid_args))
    for name, settings in config.evals.items():
      if settings.every_steps:
        for what, (fn, fn_args) in TYPES[settings.type].programs(settings, run).items():
          programs.append(compile_program(f'{name}: {what}', fn, fn_args))
  chip = hardware.chip(devices[0])
  return Plan(
    tpu=tpu,
    device_kind=devices[0].device_kind,
    num_devices=len(devices),
    num_hosts=len({d.process_index for d in devices}),
    hbm_bytes_per_device=chip.hbm_bytes_per_device,
    peak_flops_per_device=chip.peak_flops / chip.devices,
    programs=tuple(programs),
  )


def fitting_settings(config: ml_collections.ConfigDict, tpu: str) -> tuple[str, Plan] | None:
  """The first of remat, bfloat16, both, then halved batches (down to 1 per device) with which
  the train step fits ``tpu``, and its plan (each compiled); None if none fits."""
  devices = len(topology_devices(tpu))
  variants = [
    ('--config.model.remat=True', dict(remat=True), None),
    ('--config.model.dtype=bfloat16', dict(dtype='bfloat16'), None),
    (
      '--config.model.remat=True --config.model.dtype=bfloat16',
      dict(remat=True, dtype='bfloat16'),
      None,
    ),
  ]
  batch = config.train.batch_size // 2
  while batch >= devices and batch % devices == 0:
    variants.append((f'--config.train.batch_size={batch}', {}, batch))
    batch //= 2
  for flags, model, batch in variants:
    trial = config.copy_and_resolve_references()
    trial.model.update(model)
    if batch is not None:
      trial.train.batch_size = batch
    result = plan(trial, tpu, train_only=True)
    if result.fits:
      return flags, result
  return None
