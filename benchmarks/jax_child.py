"""The JAX side of the benchmarks, one measurement per process (the parent sets XLA_FLAGS).

  python -m benchmarks.jax_child --what=train --config=cifar10 --batch=32 --devices=2 --steps=3

``--what``: ``train`` (seconds per call of ``train_step.make_train_step``'s step, as main runs it),
``forward`` (one jitted eval-mode forward pass of the U-Net), ``sample`` (the compiled
``sampling.make_sample_fn`` reverse chain over ``--timesteps`` steps, per step), ``loop`` (the
train loop, ``train.train_and_evaluate``, for ``--steps`` steps without evaluation: seconds per
step from CLU's ``steps_per_sec`` over the log intervals after the first). ``--set`` takes
config overrides ``a.b=value`` (Python literals). Prints one JSON object last.
"""

import pathlib
import statistics
import tempfile
import time

from absl import app, flags

from benchmarks import common
from benchmarks.common import load_config

_WHAT = flags.DEFINE_enum('what', 'train', ['train', 'forward', 'sample', 'loop'], 'What to time.')
_CONFIG = flags.DEFINE_string('config', 'cifar10', 'configs/<name>.py')
_BATCH = flags.DEFINE_integer('batch', None, 'Global batch; default: the config train batch.')
_DEVICES = flags.DEFINE_integer('devices', None, 'CPU devices; default: config.num_cpu_devices.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed calls after the warm-up call.')
_K = flags.DEFINE_integer('steps_per_call', 1, 'Optimizer steps per call (train).')
_TIMESTEPS = flags.DEFINE_integer('timesteps', None, 'Diffusion steps T (sample); default config.')
_SET = flags.DEFINE_multi_string('set', [], 'Config overrides a.b=value.')


def timed(fn, steps: int) -> tuple[float, list[float], float]:
  """(median seconds per call, the calls' seconds, the first (compiling) call's seconds)."""
  import jax

  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), times, first


def loop_seconds(config, steps: int) -> dict:
  """The train loop of ``config`` for ``steps`` steps (no evaluation, a grid and a checkpoint at
  the end only) in a temporary workdir: its median seconds per step between metric logs."""
  import tensorflow as tf

  from diffusion_jax import train
  from diffusion_jax.run import Run

  config.train.update(num_train_steps=steps, sample_every_steps=steps, checkpoint_every_steps=steps)
  for settings in config.evals.values():
    settings.every_steps = 0
  with tempfile.TemporaryDirectory() as folder:
    config.dataset.data_dir = f'{folder}/tfds'
    train.train_and_evaluate(Run.create(config, f'{folder}/run'))
    rates = [
      float(tf.make_ndarray(value.tensor))
      for path in sorted(pathlib.Path(folder, 'run').glob('events.out.tfevents.*'))
      for event in tf.compat.v1.train.summary_iterator(str(path))
      for value in event.summary.value
      if value.tag == 'steps_per_sec'
    ]
  return dict(seconds=1 / statistics.median(rates[1:]), rates=rates)


def main(argv):
  del argv
  import jax

  config = load_config(_CONFIG.value, _SET.value)
  devices = _DEVICES.value or config.num_cpu_devices or 1
  jax.config.update('jax_num_cpu_devices', devices)
  import numpy as np

  from diffusion_jax import parallel, train_step
  from diffusion_jax.run import Run

  if _TIMESTEPS.value:
    config.diffusion.num_diffusion_timesteps = _TIMESTEPS.value
  batch = _BATCH.value or config.train.batch_size
  run = Run.create(config)
  rng = np.random.default_rng(0)
  result = dict(devices=jax.device_count(), batch=batch)
  if _WHAT.value == 'train':
    step = train_step.make_train_step(run)
    k = _K.value
    images = rng.uniform(-1, 1, (k, batch, *run.image_shape)).astype(np.float32)
    batch_array = parallel.shard_steps(run.mesh, images)
    box = {'state': run.initial_state()}

    def call():
      box['state'], metrics = step(box['state'], batch_array)
      return box['state'].step, metrics

    seconds, times, first = timed(call, _STEPS.value)
    result.update(seconds=seconds / k, call_seconds=seconds, steps_per_call=k)
  elif _WHAT.value == 'forward':
    params = run.initial_state().params
    x = jax.device_put(
      rng.uniform(-1, 1, (batch, *run.image_shape)).astype(np.float32),
      jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(parallel.DATA_AXIS)),
    )
    t = jax.device_put(np.arange(batch, dtype=np.int32) % run.process.num_timesteps)
    forward = jax.jit(lambda p, x, t: run.model.apply({'params': p}, x, t))
    seconds, times, first = timed(lambda: forward(params, x, t), _STEPS.value)
    result.update(seconds=seconds)
  elif _WHAT.value == 'loop':
    result.update(loop_seconds(config, _STEPS.value))
    result.update(first_call_seconds=0.0, times=[])
    common.emit(result)
    return
  else:
    params = run.initial_state().ema_params
    sample = run.sample_fn(batch)
    key = jax.random.PRNGKey(0)
    seconds, times, first = timed(lambda: sample(params, key), _STEPS.value)
    result.update(seconds=seconds / run.process.num_timesteps, loop_seconds=seconds)
    result.update(timesteps=run.process.num_timesteps)
  result.update(times=times, first_call_seconds=first)
  common.emit(result)


if __name__ == '__main__':
  app.run(main)
