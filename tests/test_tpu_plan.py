"""XLA:TPU compiles the run's programs for TPU slices that are not here (libtpu's deviceless
compilation): a single-host and a multi-host slice, their memory against the chip's HBM, FLOPs as
XLA:CPU counts them, and a batch XLA:TPU refuses."""

import subprocess
import sys

import jax
import pytest

from diffusion_jax import hardware, tpu_plan, train_step
from diffusion_jax.errors import SetupError
from diffusion_jax.run import Run

from conftest import REPO, load_config

pytest.importorskip(
  'libtpu', reason='compiling for a TPU needs the TPU runtime (libtpu, Linux x86-64)'
)


def digits_with_every_program():
  """The digits default with its bound in the loop too: the train step, the sample grid, the
  digits metric's sampler and the bound."""
  config = load_config('digits.py')
  config.evals.bpd.every_steps = config.train.num_train_steps
  config.train.steps_per_call = 1  # as on the CPU below, for comparable FLOP counts
  return config


# v3: a JAX device per core, 16 GiB each; v4: one per chip (megacore), 32 GiB.
@pytest.mark.parametrize(
  ('tpu', 'devices', 'hosts', 'hbm_gib'), [('v3-8', 8, 1, 16), ('v4-16', 8, 2, 32)]
)
def test_the_digits_run_compiles_for_a_tpu_slice_and_fits(tpu, devices, hosts, hbm_gib):
  config = digits_with_every_program()
  plan = tpu_plan.plan(config, tpu)
  assert (plan.num_devices, plan.num_hosts) == (devices, hosts)
  assert plan.train.name == 'train step'
  assert {p.name for p in plan.programs} == {
    'train step',
    'sample grid',
    'digits: sampler',
    'bpd: bound',
  }
  assert plan.fits and all(0 < p.bytes_per_device < 2**30 for p in plan.programs)
  chip = hardware.chip(tpu_plan.topology_devices(tpu)[0])
  assert plan.hbm_bytes_per_device == chip.hbm_bytes_per_device == hbm_gib * hardware.GiB
  assert plan.step_seconds > 0 and 0 < plan.mfu < 1
  # The same train step's FLOPs as XLA:CPU counts them, on as many CPU devices, within 10 %.
  cpu = Run.create(config, devices=jax.devices()[:devices])
  args = (cpu.abstract_state(), cpu.abstract_batch(config.train.batch_size))
  cpu_flops = hardware.step_flops(
    train_step.make_train_step(cpu), *args, train_step.abstract_metrics(cpu.mesh), mesh=cpu.mesh
  )
  tpu_flops = plan.train.flops_per_device * devices
  assert abs(tpu_flops / cpu_flops - 1) < 0.1, (tpu_flops, cpu_flops)


def test_a_batch_that_does_not_fit_is_refused_and_named():
  config = load_config('digits.py')
  config.train.batch_size = 2**19  # ~130 GiB of activations on a 16 GiB v5e chip
  plan = tpu_plan.plan(config, 'v5litepod-1', train_only=True)
  assert not plan.fits
  assert 'exceeds available HBM' in plan.train.out_of_memory
  assert plan.train.bytes_per_device > plan.hbm_bytes_per_device


def test_an_unknown_tpu_type_is_named():
  with pytest.raises(SetupError, match='--tpu=v9-8 is not a TPU type this plan knows'):
    tpu_plan.topology_devices('v9-8')


def test_the_command_prints_the_table():
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'benchmarks.tpu_compile',
      '--config=configs/digits.py:tiny',
      '--tpu=v3-8',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  row = next(line for line in out.stdout.splitlines() if line.startswith('| v3-8 |'))
  assert '| 8 (1) |' in row and '| yes |' in row and '| 16 |' in row
