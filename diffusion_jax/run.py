"""The run: what a config and a workdir make, built once and shared by training, sampling,
evaluation, figures, weight conversion, tests and benchmarks: the device mesh, the U-Net and its
optimizer (the state factory), the diffusion process, the sampler's settings, the data set and
the run's random streams.

  run = Run.create(config, workdir)
  state = run.restore_latest()          # or run.initial_state() / run.abstract_state()
  samples = run.sample_fn(64)(state.ema_params, run.key('sample'), 0)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import diffusion, input_pipeline, models, parallel, rngs, runtime, sampling
from diffusion_jax.errors import SetupError
from diffusion_jax.train_state import StateFactory, TrainState, resolve_workdir, restore_latest


@dataclasses.dataclass(frozen=True)
class Run:
  """A config's mesh, state factory, process and sampler settings, for one workdir (or none)."""

  config: ml_collections.ConfigDict
  workdir: epath.Path | None
  mesh: Mesh
  state_factory: StateFactory
  process: diffusion.GaussianDiffusion
  sampler: sampling.SamplerSettings

  @classmethod
  def create(
    cls,
    config: ml_collections.ConfigDict,
    workdir: epath.PathLike | None = None,
    *,
    devices: list[jax.Device] | None = None,
  ) -> Run:
    """The run of ``config`` in ``workdir`` over ``devices`` (default: every device of every
    host). Builds nothing heavy: no data set, no parameters."""
    return cls(
      config=config,
      workdir=None if workdir is None else resolve_workdir(workdir),
      mesh=parallel.make_mesh(devices),
      state_factory=StateFactory.from_config(config),
      process=diffusion.GaussianDiffusion.from_config(config.diffusion),
      sampler=sampling.SamplerSettings.from_config(config),
    )

  @property
  def model(self) -> models.UNet:
    return self.state_factory.model

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.state_factory.image_shape

  @functools.cached_property
  def builder(self) -> tfds.core.DatasetBuilder:
    """The prepared data set of ``config.dataset`` (a SetupError saying how to prepare it)."""
    return input_pipeline.get_builder(self.config.dataset)

  def key(self, stream: str) -> jax.Array:
    """The key of one of the run's random streams (``rngs.STREAMS``)."""
    return rngs.key(self.config.seed, stream)

  def initial_state(self) -> TrainState:
    """The state at step 0, replicated over the mesh."""
    return self.state_factory.create(self.mesh)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state, for restoring and compiling without data."""
    return self.state_factory.abstract(self.mesh)

  def abstract_key(self) -> jax.ShapeDtypeStruct:
    """A stream key's shape, dtype and (replicated) sharding."""
    key = jax.eval_shape(lambda: self.key('train'))
    return parallel.abstract_replicated(self.mesh, key.shape, key.dtype)

  def abstract_batch(self, batch_size: int, steps_per_call: int = 1) -> jax.ShapeDtypeStruct:
    """Shape, dtype and sharding of the train step's images [steps_per_call, batch_size, ...]."""
    return self.state_factory.abstract_batch(self.mesh, batch_size, steps_per_call)

  def abstract_labels(
    self, batch_size: int, steps_per_call: int = 1
  ) -> jax.ShapeDtypeStruct | None:
    """The train step's class labels [steps_per_call, batch_size] (None if unconditional)."""
    if self.model.num_classes is None:
      return None
    sharding = parallel.steps_sharding(self.mesh)
    return jax.ShapeDtypeStruct((steps_per_call, batch_size), jnp.int32, sharding=sharding)

  def sample_fn(self, num_samples: int) -> sampling.SampleFn:
    """The compiled data-parallel sampler of ``num_samples`` (rounded up to the devices) with
    the run's sampler settings: ``sample(params, rng) -> [n, H, W, C]`` in [-1, 1]."""
    return sampling.make_sample_fn(
      self.model,
      self.process,
      self.mesh,
      image_shape=self.image_shape,
      num_samples=num_samples,
      settings=self.sampler,
    )

  def chunked_sampler(self, num_samples: int, batch_size: int) -> sampling.ChunkedSampler:
    """The sampler of ``num_samples`` in chunks of at most ``batch_size`` (rounded up to the
    devices): one compiled program, called once per chunk."""
    size = sampling.chunk_size(batch_size, num_samples, self.mesh.devices.size)
    return sampling.ChunkedSampler(self.sample_fn(size), size)

  def sample_labels(self, num_samples: int) -> np.ndarray | None:
    """The classes of samples 0..n-1 (``sampling.class_labels``); None if unconditional."""
    if self.model.num_classes is None:
      return None
    return sampling.class_labels(
      self.sampler.labels, self.model.num_classes, np.arange(num_samples)
    )

  def restore_latest(self) -> TrainState:
    """The latest complete checkpoint of the workdir (a SetupError if there is none)."""
    if self.workdir is None:
      raise SetupError('This run has no workdir to restore a checkpoint from.')
    runtime.check_shared_workdir(self.workdir)
    return restore_latest(self.workdir, self.abstract_state())
