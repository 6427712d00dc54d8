"""Data-parallel ancestral sampling (Algorithm 2) over every device of every host: the compiled
sampler, sample grids, and ``--mode=sample`` from a checkpoint's EMA params."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from clu import metric_writers
from etils import epath
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from diffusion_jax import console, images, models, parallel, rngs, runtime, train_state
from diffusion_jax import diffusion as diffusion_lib

SampleFn = Callable[[Any, jax.Array], jax.Array]


SAMPLE_METHODS = ('ancestral', 'ddim')


def reverse_process(
  diffusion: diffusion_lib.GaussianDiffusion,
  *,
  method: str = 'ancestral',
  num_steps: int | None = None,
  eta: float = 0.0,
  clip_denoised: bool = True,
) -> Callable[[Callable, tuple[int, ...], jax.Array], jax.Array]:
  """``sample(model_fn, shape, rng) -> x_0``: Algorithm 2 on all T steps or on ``num_steps``
  respaced ones (``method='ancestral'``), or DDIM with ``eta`` (``method='ddim'``)."""
  if method not in SAMPLE_METHODS:
    raise ValueError(f'Unknown sample.method {method!r}; choose one of {SAMPLE_METHODS}.')
  if method == 'ddim':
    return lambda model_fn, shape, rng: diffusion.ddim_sample_loop(
      model_fn, shape, rng, num_steps=num_steps, eta=eta, clip_denoised=clip_denoised
    )
  spaced = (
    diffusion if num_steps in (None, diffusion.num_timesteps) else diffusion.respaced(num_steps)
  )
  return lambda model_fn, shape, rng: spaced.p_sample_loop(
    model_fn, shape, rng, clip_denoised=clip_denoised
  )


def sampler_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The ``reverse_process`` keywords of a config: ``sample.*`` and ``train.clip_denoised``."""
  return dict(
    method=config.sample.method,
    num_steps=config.sample.num_steps,
    eta=config.sample.eta,
    clip_denoised=config.train.clip_denoised,
  )


def make_sample_fn(
  model: nn.Module,
  diffusion: diffusion_lib.GaussianDiffusion,
  mesh: Mesh,
  *,
  image_shape: tuple[int, int, int],
  num_samples: int,
  clip_denoised: bool = True,
  method: str = 'ancestral',
  num_steps: int | None = None,
  eta: float = 0.0,
) -> SampleFn:
  """A jitted ``sample(params, rng) -> [num_samples, H, W, C]`` in [-1, 1], sharded over ``mesh``.

  ``num_samples`` is rounded up to a multiple of the device count; each device runs the whole
  reverse chain (``reverse_process`` of the keywords) on its own share with the key
  ``fold_in(rng, device index)``.
  """
  per_device = -(-num_samples // mesh.devices.size)
  reverse = reverse_process(
    diffusion, method=method, num_steps=num_steps, eta=eta, clip_denoised=clip_denoised
  )

  def per_device_sample(params, rng):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(parallel.DATA_AXIS))
    return reverse(models.model_fn(model, params), (per_device, *image_shape), rng)

  return jax.jit(
    jax.shard_map(
      per_device_sample, mesh=mesh, in_specs=(P(), P()), out_specs=P(parallel.DATA_AXIS)
    )
  )


def gather_images(samples: jax.Array, num_samples: int) -> np.ndarray:
  """Samples in [-1, 1] on any devices -> uint8 numpy [num_samples, H, W, C] on every host."""
  return images.to_uint8(parallel.gather(samples)[:num_samples])


def write_sample_grid(
  sample_fn: SampleFn,
  params: Any,
  rng: jax.Array,
  *,
  num_samples: int,
  path: epath.Path,
  writer: metric_writers.MetricWriter | None = None,
  step: int = 0,
) -> np.ndarray:
  """Samples with ``params``; process 0 writes a PNG grid at ``path`` (and to TensorBoard if a
  writer is given). Returns the uint8 images."""
  samples = gather_images(sample_fn(params, rng), num_samples)
  grid = images.image_grid(samples)
  if jax.process_index() == 0:
    images.save_png(path, grid)
    if writer is not None:
      writer.write_images(step, {'samples': grid[None]})
  return samples


@dataclasses.dataclass(frozen=True)
class Inference:
  """What sampling and evaluation need of a trained run: its model, process, mesh and EMA params."""

  workdir: epath.Path
  model: nn.Module
  diffusion: diffusion_lib.GaussianDiffusion
  mesh: Mesh
  image_shape: tuple[int, int, int]
  step: int
  ema_params: Any


def restore_inference(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> Inference:
  """The latest checkpoint of ``workdir`` set up for sampling (a SetupError if there is none)."""
  workdir = train_state.resolve_workdir(workdir)
  runtime.check_shared_workdir(workdir)
  mesh = parallel.make_mesh()
  factory = train_state.StateFactory.from_config(config)
  state = train_state.restore_latest(workdir, factory.abstract(mesh))
  return Inference(
    workdir=workdir,
    model=factory.model,
    diffusion=diffusion_lib.GaussianDiffusion.from_config(config.diffusion),
    mesh=mesh,
    image_shape=factory.image_shape,
    step=int(state.step),
    ema_params=state.ema_params,
  )


def sample_from_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, *, num_samples: int
) -> np.ndarray:
  """``--mode=sample``: samples of the latest checkpoint's EMA params -> a PNG grid and an .npz."""
  run = restore_inference(config, workdir)
  sample_fn = make_sample_fn(
    run.model,
    run.diffusion,
    run.mesh,
    image_shape=run.image_shape,
    num_samples=num_samples,
    **sampler_settings(config),
  )
  stem = run.workdir / 'samples' / f'ema_step_{run.step:08d}_n{num_samples}'
  samples = write_sample_grid(
    sample_fn,
    run.ema_params,
    rngs.key(config.seed, 'sample'),
    num_samples=num_samples,
    path=stem.with_suffix('.png'),
  )
  if jax.process_index() == 0:
    with stem.with_suffix('.npz').open('wb') as f:
      np.savez_compressed(f, images=samples, step=run.step)
    console.say('%d samples of step %d: %s.png and .npz', num_samples, run.step, stem)
  return samples
