"""The ``inception`` evaluator: FID and IS of samples with pytorch-fid's Inception, against cached
reference statistics.

Inception runs sharded where the samples live (each device featurizes its own rows); the pool3
features and logits of each chunk are then all-gathered, so every host accumulates the same
float64 statistics: per chunk of 256 that moves 256 x (2048 + 1008) float32 = 3.1 MB to each
host, and the logits kept for IS take 200 MB at 50k samples. Images never leave their devices.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax.traverse_util import unflatten_dict
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from diffusion_jax import (
  console,
  feature_metrics,
  fid,
  images,
  input_pipeline,
  parallel,
  preemption,
  sampling,
)
from diffusion_jax import run as run_lib
from diffusion_jax.config_rules import Problems
from diffusion_jax.errors import SetupError
from diffusion_jax.evaluators import samples
from diffusion_jax.evaluators.base import Evaluator, Program

NUM_IS_SPLITS = 10
LABELS = {'fid': 'FID', 'is': 'IS', 'is_std': 'IS std'}  # metric -> console label (eval/<metric>)
INCEPTION_HELP = (
  '{field}.type="inception" needs the FID Inception weights, but {field}.inception_path is not '
  "set. Download pytorch-fid's {name} ({url}), convert it once where torch is installed with\n"
  '  python -m diffusion_jax.fid --pytorch_fid_weights={name} --output=inception_fid.npz\n'
  'and pass --config.{field}.inception_path=inception_fid.npz (the digits data set has its own '
  'metric: type="digits"). See docs/evaluation.md.'
)
# (Inception params, [-1, 1] images) -> (pool3 features, IS logits), both sharded as the images.
InceptionFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
# Re-reads the reference images: batches of this process's {'image', 'mask'} rows.
BatchesFn = Callable[[], Iterable[dict[str, np.ndarray]]]


def inception_input(x: jax.Array) -> jax.Array:
  """[-1, 1] -> 8-bit values as [0, 1] floats (uint8 / 255, as pytorch-fid reads PNGs), gray
  as RGB."""
  x = images.to_pixels(x) / 255.0
  return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def make_inception_fn(mesh: Mesh) -> InceptionFn:
  """Jitted ``(params, [-1, 1] images) -> (pool3, IS logits)`` over ``mesh``; rows stay on their
  device. The IS logits are pool3 @ W without the fc bias, as OpenAI's IS code computes them."""

  def per_device(params, x):
    pool3, logits = fid.inception_outputs(params, inception_input(x))
    return pool3, logits - params['fc']['bias']

  return jax.jit(
    jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(P(), P(parallel.DATA_AXIS)),
      out_specs=(P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)),
    )
  )


def _slug(name: str) -> str:
  """'lsun/bedroom' -> 'lsun_bedroom', 'test[:20]' -> 'test_20'."""
  return re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')


def reference_stats_path(
  cache_dir: epath.PathLike, dataset_name: str, image_size: int, split: str, count: int
) -> epath.Path:
  """``<cache_dir>/<dataset>_<size>px_<split>_<count>.npz``, e.g. ``cifar10_32px_train_50000.npz``
  (``split`` may be cut, e.g. ``train[:50000]``)."""
  name = f'{_slug(dataset_name)}_{image_size}px_{_slug(split)}_{count}.npz'
  return epath.Path(cache_dir) / name


def _exists_everywhere(path: epath.Path) -> bool:
  """Whether ``path`` exists, as process 0 sees it (so every host takes the same branch)."""
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(path.exists())))


def reference_stats(
  path: epath.Path, batches: BatchesFn, inception_fn: InceptionFn, params: Any, mesh: Mesh
) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the pool3 features of the mask-1 rows of ``batches()``, read from ``path`` if
  cached there, else computed on every host and written there by process 0."""
  if _exists_everywhere(path):
    logging.info('FID reference statistics from %s.', path)
    mu, sigma, _ = feature_metrics.load_stats(path)
    return mu, sigma
  logging.info('Computing FID reference statistics into %s.', path)
  stats = feature_metrics.FeatureStats(fid.POOL3_DIM)
  for local in batches():
    preemption.check()  # a notice stops the work here, on every host alike
    batch = parallel.shard_rows(mesh, local)
    pool3 = parallel.gather(inception_fn(params, batch['image'])[0])
    stats.update(pool3[parallel.gather(batch['mask']) > 0])
  mu, sigma = stats.mean_cov()
  if jax.process_index() == 0:
    feature_metrics.save_stats(path, mu, sigma, stats.num)
  return mu, sigma


@dataclasses.dataclass(frozen=True)
class InceptionScore:
  """FID against the reference (mu, sigma) and IS of samples; a ``samples.ScoreFn``."""

  inception_fn: InceptionFn
  params: Any  # replicated over the mesh
  reference: tuple[np.ndarray, np.ndarray]

  @classmethod
  def create(
    cls, params: Any, mesh: Mesh, *, reference_path: epath.Path, reference_batches: BatchesFn
  ) -> InceptionScore:
    """Places the Inception ``params`` on ``mesh`` once and loads (or computes) the reference."""
    params = jax.device_put(params, parallel.replicated(mesh))
    inception_fn = make_inception_fn(mesh)
    reference = reference_stats(reference_path, reference_batches, inception_fn, params, mesh)
    return cls(inception_fn, params, reference)

  def __call__(self, chunks: Iterable[jax.Array], num_samples: int) -> dict[str, float]:
    """FID, IS and its std over ``NUM_IS_SPLITS`` splits of the first ``num_samples`` samples."""
    stats, logits = feature_metrics.FeatureStats(fid.POOL3_DIM), []
    outputs = (self.inception_fn(self.params, x) for x in chunks)
    for pool3, chunk_logits in samples.gathered_rows(outputs, num_samples):
      stats.update(pool3)
      logits.append(chunk_logits)
    is_mean, is_std = feature_metrics.inception_score(np.concatenate(logits), NUM_IS_SPLITS)
    return {
      'fid': feature_metrics.frechet_distance(*stats.mean_cov(), *self.reference),
      'is': is_mean,
      'is_std': is_std,
    }


def problems(
  name: str, settings: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> Problems:
  """The sample settings (IS averages over ``NUM_IS_SPLITS`` splits) and the Inception weights."""
  del config
  found = samples.problems(name, settings, minimum=NUM_IS_SPLITS)
  if not settings.get('inception_path'):
    found[f'evals.{name}.inception_path'] = INCEPTION_HELP.format(
      field=f'evals.{name}', name=fid.PYTORCH_FID_WEIGHTS, url=fid.PYTORCH_FID_WEIGHTS_URL
    )
  return found


def create(
  name: str, settings: ml_collections.ConfigDict, run: run_lib.Run, *, in_loop: bool
) -> Evaluator:
  """FID and IS of the run's samples; loads the weights and the reference statistics (computed
  once from ``reference_split`` and cached in ``reference_dir``, default workdir/fid_stats)."""
  split = samples.reference_split(settings)
  input_pipeline.check_splits(run.builder, {f'evals.{name}.reference_split': split})
  try:
    params = fid.load_params(settings.inception_path)
  except FileNotFoundError as e:
    raise SetupError(f'evals.{name}.inception_path: {e}') from None
  cache = settings.reference_dir or epath.Path(run.workdir) / 'fid_stats'
  count = run.builder.info.splits[split].num_examples
  dataset = run.config.dataset
  path = reference_stats_path(cache, dataset.name, dataset.image_size, split, count)
  batch_size = sampling.round_up(settings.batch_size, run.mesh.devices.size)

  def reference_batches() -> Iterable[dict[str, np.ndarray]]:
    batches, num_batches = input_pipeline.create_eval_dataset(
      run.builder, dataset, split, batch_size=batch_size
    )
    return console.Counted(batches, f'FID reference of {split} (batches)', num_batches)

  score = InceptionScore.create(
    params, run.mesh, reference_path=path, reference_batches=reference_batches
  )
  return samples.create(settings, run, score, in_loop=in_loop)


def programs(settings: ml_collections.ConfigDict, run: run_lib.Run) -> dict[str, Program]:
  """The sampler and the Inception forward on one chunk of samples."""
  params = {
    name: parallel.abstract_replicated(run.mesh, shape, jnp.float32)
    for name, shape in fid.param_shapes().items()
  }
  images = parallel.abstract_rows(run.mesh, samples.chunk_shape(settings, run), jnp.float32)
  forward = (make_inception_fn(run.mesh), (unflatten_dict(params, sep='/'), images))
  return {**samples.programs(settings, run), 'inception': forward}
