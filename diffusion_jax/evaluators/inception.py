"""FID and IS of samples with pytorch-fid's Inception, against cached reference statistics.

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
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from diffusion_jax import fid, images, parallel
from diffusion_jax.evaluators import samples

NUM_IS_SPLITS = 10
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
    mu, sigma, _ = fid.load_stats(path)
    return mu, sigma
  logging.info('Computing FID reference statistics into %s.', path)
  stats = fid.FeatureStats(fid.POOL3_DIM)
  for local in batches():
    batch = parallel.shard_rows(mesh, local)
    pool3 = parallel.gather(inception_fn(params, batch['image'])[0])
    stats.update(pool3[parallel.gather(batch['mask']) > 0])
  mu, sigma = stats.mean_cov()
  if jax.process_index() == 0:
    fid.save_stats(path, mu, sigma, stats.num)
  return mu, sigma


@dataclasses.dataclass(frozen=True)
class InceptionEvaluator:
  """FID against the reference (mu, sigma) and IS of samples; a ``samples.ScoreFn``."""

  inception_fn: InceptionFn
  params: Any  # replicated over the mesh
  reference: tuple[np.ndarray, np.ndarray]

  @classmethod
  def create(
    cls, params: Any, mesh: Mesh, *, reference_path: epath.Path, reference_batches: BatchesFn
  ) -> InceptionEvaluator:
    """Places the Inception ``params`` on ``mesh`` once and loads (or computes) the reference."""
    params = jax.device_put(params, parallel.replicated(mesh))
    inception_fn = make_inception_fn(mesh)
    reference = reference_stats(reference_path, reference_batches, inception_fn, params, mesh)
    return cls(inception_fn, params, reference)

  def __call__(self, chunks: Iterable[jax.Array], num_samples: int) -> dict[str, float]:
    """FID, IS and its std over ``NUM_IS_SPLITS`` splits of the first ``num_samples`` samples."""
    stats, logits = fid.FeatureStats(fid.POOL3_DIM), []
    outputs = (self.inception_fn(self.params, x) for x in chunks)
    for pool3, chunk_logits in samples.gathered_rows(outputs, num_samples):
      stats.update(pool3)
      logits.append(chunk_logits)
    is_mean, is_std = fid.inception_score(np.concatenate(logits), NUM_IS_SPLITS)
    return {
      'fid': fid.frechet_distance(*stats.mean_cov(), *self.reference),
      'is': is_mean,
      'is_std': is_std,
    }
