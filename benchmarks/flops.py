"""FLOPs per train step and per sampling step of each paper config (XLA's cost analysis of the
lowered programs, on this CPU), the speed they imply on Cloud TPU slices, and the FLOP rate the
train step achieves on this machine.

  python -m benchmarks.flops [--measure=cifar10:32,digits:64]

The implied speed is steps/s = MFU x peak FLOP/s of the slice / FLOPs per step, at the MFU the
paper's own TPU v3-8 figures imply (CIFAR10: 21 steps/s at batch 128; 256x256: 2.2 steps/s at
batch 64). The second table times the train step here (``benchmarks.jax_child``, one process per
model, the config's CPU devices) and divides: FLOPs per step / seconds per step, which is what
``hardware.throughput_metrics`` logs as ``train/flops_per_second`` on a CPU (no MFU: a CPU has
no entry in the peak table). Prints both tables and, last, the CIFAR10 FLOPs and FLOP rate.
"""

import os
import pathlib

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import common
from diffusion_jax import config_defaults, hardware, train_step
from diffusion_jax.run import Run

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
# The paper's TPU v3-8 speeds (Appendix B): config file -> train steps/s at its batch size.
PAPER_V3_8 = {'cifar10.py': 21.0, 'lsun_bedroom.py': 2.2}
_MEASURE = flags.DEFINE_list(
  'measure', ['cifar10:32', 'digits:64'], 'config:batch train steps to time here ([] for none).'
)
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per measurement (digits: 10x).')
SLICES = {
  'v3-8': ('TPU v3', 4),
  'v4-8': ('TPU v4', 4),
  'v4-32': ('TPU v4', 16),
  'v5e-8': ('TPU v5e', 8),
}


def step_flops(config_file: str, batch: int) -> tuple[float, float]:
  """(FLOPs of one train step at global batch ``batch``, FLOPs of one sampling step per image)."""
  config = config_defaults.load(str(CONFIGS / config_file))
  run = Run.create(config, devices=jax.devices()[:1])
  step = train_step.make_train_step(run)
  images = run.abstract_batch(batch)
  train_flops = hardware.step_flops(step, run.abstract_state(), images, mesh=run.mesh)
  x = jax.ShapeDtypeStruct((1, *run.image_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  params = run.abstract_state().params
  forward = jax.jit(lambda p, x, t: run.model.apply({'params': p}, x, t))
  return train_flops, forward.lower(params, x, t).cost_analysis()['flops']


def main(argv):
  del argv
  rows = []
  for config_file, steps_per_s in PAPER_V3_8.items():
    batch = config_defaults.load(str(CONFIGS / config_file)).train.batch_size
    train_flops, sample_flops = step_flops(config_file, batch)
    v3_peak = hardware.CHIPS['TPU v3'].peak_flops * 4
    mfu = steps_per_s * train_flops / v3_peak
    speeds = {
      name: mfu * hardware.CHIPS[kind].peak_flops * chips / train_flops
      for name, (kind, chips) in SLICES.items()
    }
    rows.append((config_file, batch, train_flops, sample_flops, steps_per_s, mfu, speeds))
  print(
    '| config | batch | GFLOP / train step | GFLOP / sampling step / image | paper v3-8 '
    '| implied MFU | ' + ' | '.join(f'{s} steps/s' for s in SLICES) + ' |'
  )
  print('|---' * (6 + len(SLICES)) + '|')
  for config_file, batch, train_flops, sample_flops, paper, mfu, speeds in rows:
    print(
      f'| {config_file} | {batch} | {train_flops / 1e9:,.0f} | {sample_flops / 1e9:,.1f} | '
      f'{paper} | {mfu:.0%} | ' + ' | '.join(f'{v:.1f}' for v in speeds.values()) + ' |'
    )
  last = f'CIFAR10 train step at batch {rows[0][1]}: {rows[0][2] / 1e9:,.0f} GFLOP'
  achieved = measure_here()
  if 'cifar10' in achieved:
    batch, rate = achieved['cifar10']
    last += f'; achieved here at batch {batch}: {rate / 1e9:,.0f} GFLOP/s'
  print(last)


def measure_here() -> dict[str, tuple[int, float]]:
  """Times the train steps of ``--measure`` here and prints the achieved FLOP rate table."""
  rows, achieved = [], {}
  for item in _MEASURE.value:
    name, batch = item.split(':')
    config = config_defaults.load(str(CONFIGS / f'{name}.py'))
    devices = config.num_cpu_devices or 1
    steps = _STEPS.value * (10 if name == 'digits' else 1)
    command = common.module_command(
      'jax_child',
      f'--config={name}',
      f'--batch={batch}',
      f'--devices={devices}',
      f'--steps={steps}',
    )
    seconds = common.run_json(command, common.child_env())['seconds']
    flops = step_flops(f'{name}.py', int(batch))[0]
    metrics = hardware.throughput_metrics(flops, seconds, device_count=devices)
    rate = metrics['train/flops_per_second']
    achieved[name] = (int(batch), rate)
    rows.append(
      (
        f'{name}.py',
        batch,
        devices,
        f'{flops / 1e9:,.1f}',
        f'{seconds:.3f}',
        f'{rate / 1e9:,.0f}',
        f'{rate / 1e9 / os.cpu_count():,.0f}',
        ', '.join(sorted(metrics)),
      )
    )
  if rows:
    print(f'\nMeasured here: {common.machine()}')
    print(
      common.table(
        [
          'config',
          'batch',
          'CPU devices',
          'GFLOP / train step',
          's / step',
          'achieved GFLOP/s',
          'per core',
          'logged keys',
        ],
        rows,
      )
    )
  return achieved


if __name__ == '__main__':
  app.run(main)
