"""The process's JAX runtime: CPU device count, multi-host start-up, and checks that a run is
where the user meant it to be (on the asked-for accelerator, with a workdir every host shares)."""

import os
import sys
import uuid

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import accelerator, console
from diffusion_jax.errors import SetupError

_BUSY_TPU_HELP = (
  'Another process may hold the TPU: list it with `sudo lsof -w /dev/accel* /dev/vfio/*` and end '
  'it (`launch/tpu.sh stop` does so on every host and removes /tmp/libtpu_lockfile).'
)


def start(
  *,
  num_cpu_devices: int | None,
  distributed: bool,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Splits a CPU host into ``num_cpu_devices`` devices, joins the other processes if
  ``distributed``, then checks the platform (before anything else touches JAX). A host with no
  accelerator runs on the CPU without probing for one (libtpu, when installed to compile for TPU
  topologies, would print its start-up errors)."""
  if not asked_platforms() and accelerator.kind() == 'cpu':
    jax.config.update('jax_platforms', 'cpu')
  if num_cpu_devices:
    jax.config.update('jax_num_cpu_devices', num_cpu_devices)
  if distributed:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  check_platform()
  console.say(
    'JAX process %d / %d, %d local / %d global devices (%s).',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
  )


def steps_per_call(train_config: ml_collections.ConfigDict) -> int:
  """``train.steps_per_call``, or if None: 10 on TPU/GPU, 1 on a CPU (XLA:CPU runs the step ~16x
  slower inside a loop, so it unrolls the steps of a call: k steps compile k times over)."""
  if train_config.steps_per_call is not None:
    return train_config.steps_per_call
  return 1 if jax.devices()[0].platform == 'cpu' else 10


def checkpoint_minutes(train_config: ml_collections.ConfigDict) -> float | None:
  """``train.checkpoint_every_minutes``, or if None: 30 on TPU/GPU (a preempted or maintained
  VM loses at most that), none on a CPU (0: none)."""
  minutes = train_config.checkpoint_every_minutes
  if minutes is None:
    return None if jax.devices()[0].platform == 'cpu' else 30.0
  return minutes or None


def agree(decision: bool) -> bool:
  """Process 0's ``decision``, on every process (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return decision
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(decision)))


def check_platform() -> None:
  """A SetupError instead of a silent fallback: the asked-for platform (``JAX_PLATFORMS`` or
  ``--jax_platforms``) must start, and a TPU VM must not train on its CPU."""
  asked = asked_platforms()
  try:
    platform = jax.devices()[0].platform
  except RuntimeError as e:
    raise SetupError(
      f'JAX could not start the platform asked for (jax_platforms={asked!r}): {e}. '
      + (_BUSY_TPU_HELP if 'tpu' in asked else '')
    ) from None
  if platform == 'cpu' and 'cpu' not in asked and accelerator.has_tpu():
    chips = ', '.join(accelerator.tpu_chips()) or f'{accelerator.TPU_ENV} is set'
    raise SetupError(
      f'This machine has TPU chips ({chips}) but JAX started on the CPU. '
      + _BUSY_TPU_HELP
      + ' To run on the CPU here on purpose, set JAX_PLATFORMS=cpu.'
    )


def asked_platforms() -> str:
  """The platforms the user asked JAX for (``JAX_PLATFORMS``, ``--jax_platforms``; '' if none)."""
  return jax.config.jax_platforms or ''


def check_shared_workdir(workdir: epath.Path) -> None:
  """With several processes, a SetupError unless every one of them sees ``workdir`` (process 0
  writes a marker there; a local folder on separate hosts fails this)."""
  if jax.process_count() == 1:
    return
  token = multihost_utils.broadcast_one_to_all(np.frombuffer(uuid.uuid4().bytes, np.uint8))
  marker = workdir / f'.shared_check_{bytes(np.asarray(token, np.uint8)).hex()}'
  if jax.process_index() == 0:
    marker.write_text('')
  multihost_utils.sync_global_devices('wrote the shared-workdir marker')
  seen = multihost_utils.process_allgather(np.asarray(marker.exists()))
  multihost_utils.sync_global_devices('checked the shared-workdir marker')
  if jax.process_index() == 0:
    marker.unlink()
  if not np.all(seen):
    hosts = [i for i, ok in enumerate(np.asarray(seen).ravel()) if not ok]
    raise SetupError(
      f'The workdir {workdir} is not shared by all {jax.process_count()} processes (processes '
      f'{hosts} cannot see what process 0 wrote there): multi-host runs need a workdir every host '
      'reads and writes, e.g. --workdir=gs://BUCKET/run.'
    )


def barrier(name: str) -> None:
  """Waits until every process got here (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def is_coordinator() -> bool:
  """Whether this is process 0, the one that prepares shared files."""
  return jax.process_index() == 0


def exit_now(status: int) -> None:
  """Ends the process without the seconds TensorFlow's and XLA's teardown take (a preempted VM
  may not have them), after flushing the logs and leaving the other processes cleanly."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  if jax.process_count() > 1:
    jax.distributed.shutdown()
  os._exit(status)
