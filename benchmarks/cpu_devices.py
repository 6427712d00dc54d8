"""Digits train-step time on one CPU device vs `num_cpu_devices` devices, in alternating runs.

  python benchmarks/cpu_devices.py --repeats=3 [--devices=2] [--steps=30]

Each measurement runs in its own process (the CPU device count is fixed when JAX starts) and
prints the mean step time of the digits config's jitted train step on a fixed batch, after a
compile-and-warm-up step. The runs alternate so that machine noise hits both settings alike;
the ratio of the medians is the figure to quote.
"""

import pathlib
import statistics
import subprocess
import sys
import time

from absl import app, flags

from diffusion_jax import config_defaults

DIGITS_CONFIG = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'digits.py'

_DEVICES = flags.DEFINE_integer('devices', 2, 'CPU devices to compare against one.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Alternating runs per setting.')
_STEPS = flags.DEFINE_integer('steps', 30, 'Timed steps per run.')
_CHILD = flags.DEFINE_integer('child', 0, 'Internal: time the step on this many devices.')


def digits_config():
  """configs/digits.py, the embedded default."""
  return config_defaults.load(str(DIGITS_CONFIG))


def time_step(num_devices: int, steps: int) -> float:
  """Mean seconds per digits train step on ``num_devices`` CPU devices."""
  import jax

  jax.config.update('jax_num_cpu_devices', num_devices)
  import numpy as np

  from diffusion_jax import diffusion as diffusion_lib
  from diffusion_jax import parallel, train_state, train_step

  config = digits_config()
  mesh = parallel.make_mesh()
  factory = train_state.StateFactory.from_config(config)
  diffusion = diffusion_lib.GaussianDiffusion.from_config(config.diffusion)
  step = train_step.make_train_step(config.optim, factory.model, diffusion, mesh)
  state = factory.create(mesh)
  shape = (1, config.train.batch_size, *factory.image_shape)
  images = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  batch = parallel.shard_steps(mesh, images)
  state, _ = step(state, batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / steps


def main(argv):
  del argv
  if _CHILD.value:
    print(time_step(_CHILD.value, _STEPS.value))
    return
  times = {1: [], _DEVICES.value: []}
  for _ in range(_REPEATS.value):
    for n in times:
      out = subprocess.run(
        [sys.executable, __file__, f'--child={n}', f'--steps={_STEPS.value}'],
        check=True,
        capture_output=True,
        text=True,
      ).stdout
      times[n].append(float(out.split()[-1]))
  one, many = (statistics.median(times[n]) for n in times)
  batch_size = digits_config().train.batch_size
  print(f'digits train step (batch {batch_size}), median of {_REPEATS.value} alternating runs:')
  for n, ts in times.items():
    print(
      f'  {n} CPU device(s): {statistics.median(ts):.3f} s  (runs: '
      f'{", ".join(f"{t:.3f}" for t in ts)})'
    )
  print(f'  ratio 1 / {_DEVICES.value} devices: {one / many:.2f}x')


if __name__ == '__main__':
  app.run(main)
