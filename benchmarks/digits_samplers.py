"""Digits sample quality against sampling cost: the digits metric of one trained run's EMA params
under each sampler (ancestral on all T steps, respaced, DDIM with eta 0 and 1).

  python -m benchmarks.digits_samplers --workdir=RUN [--data_dir=DIR]

RUN is a finished ``configs/digits.py`` run. The samples use the evaluation keys (as
``--mode=eval``), 500 of them; seconds are the wall time of drawing and scoring them, after a
first call that compiles.
"""

import dataclasses
import pathlib
import time

from absl import app, flags

from diffusion_jax import config_defaults, evaluate, runtime, sampling
from diffusion_jax.evaluators.registry import TYPES
from diffusion_jax.run import Run

_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished configs/digits.py run.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'The TFDS data dir of that run.')
CONFIG = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'digits.py'
SETTINGS = (
  ('ancestral', None, 0.0),
  ('ancestral', 100, 0.0),
  ('ancestral', 50, 0.0),
  ('ancestral', 25, 0.0),
  ('ddim', 50, 0.0),
  ('ddim', 20, 0.0),
  ('ddim', 10, 0.0),
  ('ddim', 50, 1.0),
  ('ddim', 20, 1.0),
  ('ddim', 10, 1.0),
)


def main(argv):
  del argv
  config = config_defaults.load(str(CONFIG))
  config.dataset.data_dir = _DATA_DIR.value
  runtime.start(num_cpu_devices=config.num_cpu_devices, distributed=False)
  run = Run.create(config, _WORKDIR.value)
  state = run.restore_latest()
  settings = config.evals.digits
  T = config.diffusion.num_diffusion_timesteps
  print(f'digits run {_WORKDIR.value} at step {int(state.step)}, {settings.num_samples} samples')
  print('| sampler | steps | confident | FD | min … max class | seconds |')
  print('|---|---|---|---|---|---|')
  key = evaluate.evaluator_key(run, 'digits')  # the samples --mode=eval scores
  for method, num_steps, eta in SETTINGS:
    sampler = sampling.SamplerSettings(method, num_steps, eta, config.sample.clip_denoised)
    evaluator = TYPES['digits'].create(
      'digits', settings, dataclasses.replace(run, sampler=sampler), in_loop=False
    )
    evaluator(state.ema_params, key)  # compiles
    start = time.perf_counter()
    m = evaluator(state.ema_params, key).scalars
    seconds = time.perf_counter() - start
    name = (
      'ancestral'
      if method == 'ancestral' and num_steps is None
      else ('respaced' if method == 'ancestral' else f'DDIM η={eta:g}')
    )
    print(
      f'| {name} | {num_steps or T} | {m["digits_confident_fraction"]:.3f} | '
      f'{m["digits_fd"]:.1f} | {100 * m["digits_min_class_fraction"]:.1f}% … '
      f'{100 * m["digits_max_class_fraction"]:.1f}% | {seconds:.1f} |'
    )


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
