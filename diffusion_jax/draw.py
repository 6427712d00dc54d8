"""``--mode=sample``: samples of the latest checkpoint's EMA params, as a PNG grid and an .npz."""

import jax
import numpy as np

from diffusion_jax import console, sampling
from diffusion_jax import run as run_lib


def sample_from_checkpoint(run: run_lib.Run, *, num_samples: int) -> np.ndarray:
  """``num_samples`` samples of the run's latest checkpoint with its sampler settings, from the
  ``sample`` stream -> ``workdir/samples/ema_step_<N>_n<num_samples>.png`` and ``.npz``."""
  state = run.restore_latest()
  step = int(state.step)
  stem = run.workdir / 'samples' / f'ema_step_{step:08d}_n{num_samples}'
  samples = sampling.write_sample_grid(
    run.chunked_sampler(num_samples, run.config.train.batch_size),
    state.ema_params,
    run.key('sample'),
    num_samples=num_samples,
    path=stem.with_suffix('.png'),
    labels=run.sample_labels(num_samples),
  )
  if jax.process_index() == 0:
    with stem.with_suffix('.npz').open('wb') as f:
      labels = run.sample_labels(num_samples)
      classes = {} if labels is None else {'labels': labels}
      np.savez_compressed(f, images=samples, step=step, **classes)
    console.say('%d samples of step %d: %s.png and .npz', num_samples, step, stem)
  return samples
