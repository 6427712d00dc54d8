"""Data-parallel sampling over every device of every host: the sampler's settings, the compiled
sampler (Algorithm 2, respaced, or DDIM) and sample grids."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers
from etils import epath
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from diffusion_jax import diffusion, images, models, parallel, preemption

SampleFn = Callable[[Any, jax.Array, jax.Array], jax.Array]  # (params, rng, first row)


SAMPLE_METHODS = ('ancestral', 'ddim', 'dpm_solver++')


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """How samples are drawn (``config.sample``): Algorithm 2 on all T steps or on ``num_steps``
  respaced ones (``method='ancestral'``), DDIM with ``eta`` (``method='ddim'``) or
  DPM-Solver++(2M) (``method='dpm_solver++'``) on ``num_steps``; x̂_0 clipped to [-1, 1] at
  every step if ``clip_denoised``."""

  method: str = 'ancestral'
  num_steps: int | None = None
  eta: float = 0.0
  clip_denoised: bool = True
  guidance: float = 0.0  # classifier-free guidance w (class-conditional models)
  labels: tuple[int, ...] = ()  # the classes to sample (``class_labels``)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> SamplerSettings:
    sample = config.sample
    return cls(
      sample.method,
      sample.num_steps,
      sample.eta,
      sample.clip_denoised,
      sample.guidance,
      tuple(sample.labels),
    )

  def as_dict(self) -> dict[str, Any]:
    """The settings as JSON writes them (``labels`` a list)."""
    return {**dataclasses.asdict(self), 'labels': list(self.labels)}


def reverse_process(
  process: diffusion.GaussianDiffusion, settings: SamplerSettings
) -> Callable[[diffusion.ModelFn, tuple[int, ...], jax.Array], jax.Array]:
  """``sample(model_fn, shape, rng) -> x_0`` of ``settings`` on ``process``."""
  if settings.method not in SAMPLE_METHODS:
    raise ValueError(f'Unknown sample.method {settings.method!r}; choose one of {SAMPLE_METHODS}.')
  clip, num_steps = settings.clip_denoised, settings.num_steps

  def ddim(model_fn, shape, rng):
    return process.ddim_sample_loop(
      model_fn, shape, rng, num_steps=num_steps, eta=settings.eta, clip_denoised=clip
    )

  def dpm_solver(model_fn, shape, rng):
    return process.dpm_solver_loop(model_fn, shape, rng, num_steps=num_steps, clip_denoised=clip)

  if settings.method == 'ddim':
    return ddim
  if settings.method == 'dpm_solver++':
    return dpm_solver
  spaced = process if num_steps in (None, process.num_timesteps) else process.respaced(num_steps)

  def ancestral(model_fn, shape, rng):
    return spaced.p_sample_loop(model_fn, shape, rng, clip_denoised=clip)

  return ancestral


def class_labels(labels: tuple[int, ...], num_classes: int, rows):
  """The class of each sample row (numpy or JAX ints): ``labels`` cycled, or with none given the
  classes spread evenly (row i: class i mod num_classes)."""
  if not labels:
    return rows % num_classes
  xp = np if isinstance(rows, np.ndarray) else jnp
  return xp.asarray(labels, xp.int32)[rows % len(labels)]


def make_sample_fn(
  model: nn.Module,
  process: diffusion.GaussianDiffusion,
  mesh: Mesh,
  *,
  image_shape: tuple[int, int, int],
  num_samples: int,
  settings: SamplerSettings,
) -> SampleFn:
  """A jitted ``sample(params, rng, first_row) -> [num_samples, H, W, C]`` in [-1, 1], sharded
  over ``mesh``.

  ``num_samples`` is rounded up to a multiple of the device count; each device runs the whole
  reverse chain (``reverse_process`` of ``settings``) on its own share with the key
  ``fold_in(rng, device index)``. A class-conditional model samples row ``first_row + i`` of the
  result from its ``class_labels``, guided by ``settings.guidance``; others ignore ``first_row``.
  """
  per_device = -(-num_samples // mesh.devices.size)
  reverse = reverse_process(process, settings)

  def per_device_sample(params, rng, first_row):
    device = jax.lax.axis_index(parallel.DATA_AXIS)
    rng = jax.random.fold_in(rng, device)
    labels = None
    if model.num_classes is not None:
      rows = first_row + device * per_device + jnp.arange(per_device)
      labels = class_labels(settings.labels, model.num_classes, rows)
    model_fn = models.model_fn(model, params, labels=labels, guidance=settings.guidance)
    return reverse(model_fn, (per_device, *image_shape), rng)

  return jax.jit(
    jax.shard_map(
      per_device_sample, mesh=mesh, in_specs=(P(), P(), P()), out_specs=P(parallel.DATA_AXIS)
    )
  )


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is >= ``n``."""
  return -(-n // multiple) * multiple


def chunk_size(batch_size: int, num_samples: int, num_devices: int) -> int:
  """Samples per sampling call: ``batch_size``, or fewer if ``num_samples`` needs fewer, rounded
  up to a multiple of the device count."""
  return min(round_up(batch_size, num_devices), round_up(num_samples, num_devices))


@dataclasses.dataclass(frozen=True)
class ChunkedSampler:
  """A compiled ``sample(params, rng)`` of ``chunk_size`` samples, called once per chunk: a
  preemption notice stops the work between chunks (on every host alike)."""

  sample_fn: SampleFn
  chunk_size: int

  def chunks(self, params: Any, rng: jax.Array, num_samples: int) -> Iterator[jax.Array]:
    """Sharded [-1, 1] chunks of at least ``num_samples`` rows, chunk c from ``fold_in(rng, c)``."""
    for c in range(-(-num_samples // self.chunk_size)):
      preemption.check()
      yield self.sample_fn(params, jax.random.fold_in(rng, c), jnp.int32(c * self.chunk_size))


def gather_images(samples: jax.Array, num_samples: int) -> np.ndarray:
  """Samples in [-1, 1] on any devices -> uint8 numpy [num_samples, H, W, C] on every host."""
  return images.to_uint8(parallel.gather(samples)[:num_samples])


def write_sample_grid(
  sampler: ChunkedSampler,
  params: Any,
  rng: jax.Array,
  *,
  num_samples: int,
  path: epath.Path,
  writer: metric_writers.MetricWriter | None = None,
  step: int = 0,
  labels: np.ndarray | None = None,
) -> np.ndarray:
  """``num_samples`` samples with ``params`` (chunk by chunk); process 0 writes a PNG grid at
  ``path`` (and to TensorBoard if a writer is given), one row per class if the samples'
  ``labels`` are given. Returns the uint8 images, in sample order."""
  chunks = sampler.chunks(params, rng, num_samples)
  samples = np.concatenate([gather_images(chunk, num_samples) for chunk in chunks])[:num_samples]
  if labels is None:
    grid = images.image_grid(samples)
  else:
    order = np.argsort(labels, kind='stable')
    grid = images.image_grid(samples[order], columns=int(np.bincount(labels).max()))
  if jax.process_index() == 0:
    images.save_png(path, grid)
    if writer is not None:
      writer.write_images(step, {'samples': grid[None]})
  return samples
