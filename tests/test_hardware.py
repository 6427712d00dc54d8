"""Peak FLOP rates, MFU and XLA's FLOP counts of the train step."""

import types

import jax
import jax.numpy as jnp
import pytest

from diffusion_jax import hardware, train_step
from diffusion_jax.errors import SetupError
from diffusion_jax.run import Run

V3_CORE = types.SimpleNamespace(device_kind='TPU v3')
CPU = types.SimpleNamespace(device_kind='cpu')


def test_peak_is_per_jax_device():
  assert hardware.peak_flops_per_device(V3_CORE) == 123e12 / 2  # two cores, two devices per chip
  assert hardware.peak_flops_per_device(CPU) is None


@pytest.mark.parametrize(
  ('kind', 'hbm_gib_per_device'),
  [('TPU v2', 8), ('TPU v3', 16), ('TPU v4', 32), ('TPU v5 lite', 16), ('TPU v5', 95)]
  + [('TPU v6 lite', 32), ('TPU7x', 96)],
)
def test_every_tpu_generation_has_its_hbm_per_device(kind, hbm_gib_per_device):
  chip = hardware.chip(types.SimpleNamespace(device_kind=kind))
  assert chip.hbm_bytes_per_device == hbm_gib_per_device * hardware.GiB


def test_mfu_and_throughput_metrics():
  # 8 v3 cores at 492 TFLOP/s peak; 49.2 TFLOP per step at 2 steps/s is 20 % of it.
  assert hardware.train_mfu(49.2e12, 0.5, 8, V3_CORE) == pytest.approx(0.2)
  metrics = hardware.throughput_metrics(49.2e12, 0.5, 8, V3_CORE)
  assert metrics == pytest.approx({'train/flops_per_second': 98.4e12, 'train/mfu': 0.2})
  assert hardware.throughput_metrics(1e9, 0.5, 2, CPU) == {'train/flops_per_second': 2e9}


def abstract_step(config, devices, batch: int):
  run = Run.create(config, devices=devices)
  step = train_step.make_train_step(run)
  return step, (run.abstract_state(), run.abstract_batch(batch)), run


def test_step_flops_count_the_global_batch_on_any_mesh(tiny_config):
  """shard_map programs are costed per device: ``mesh=`` scales them to the whole step."""
  batch = tiny_config.train.batch_size
  counts = []
  for devices in (jax.devices(), jax.devices()[:1]):
    step, args, run = abstract_step(tiny_config, devices, batch)
    counts.append(hardware.step_flops(step, *args, mesh=run.mesh))
  # Each device also applies Adam and the EMA to the whole replicated state: on this tiny model
  # that is a few % more FLOPs on 8 devices (on the paper's U-Nets, under 0.1 %).
  assert counts[1] < counts[0] < 1.05 * counts[1]
  # Forward + backward is about 3 forward passes of the global batch (plain jit: global shapes).
  x = jax.ShapeDtypeStruct((batch, *run.image_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  params = run.abstract_state().params
  forward = jax.jit(lambda p, x, t: run.model.apply({'params': p}, x, t))
  ratio = counts[1] / hardware.step_flops(forward, params, x, t)
  assert 2.5 < ratio < 4, ratio


def test_a_program_too_big_for_the_device_is_refused_before_it_runs():
  compiled = jax.jit(lambda x: (x @ x.T).sum()).lower(jnp.ones((256, 512))).compile()
  needed = hardware.compiled_bytes(compiled)
  assert needed >= 256 * 512 * 4  # at least its argument
  device = types.SimpleNamespace(device_kind='TPU v9', memory_stats=lambda: {'bytes_limit': 1024})
  with pytest.raises(
    SetupError, match=r'The step needs 0\.\d+ GiB .* TPU v9.*RESOURCE_EXHAUSTED.*fix'
  ):
    hardware.check_fits(compiled, device, what='The step', fix='fix it')
  roomy = types.SimpleNamespace(device_kind='TPU v9', memory_stats=lambda: {'bytes_limit': needed})
  hardware.check_fits(compiled, roomy, what='The step', fix='fix it')
  hardware.check_fits(compiled, jax.devices()[0], what='The step', fix='fix it')  # CPU: no limit
