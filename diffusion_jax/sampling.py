"""Data-parallel ancestral sampling (Algorithm 2) over every device of every host, and image grids."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from PIL import Image

from diffusion_jax import diffusion as diffusion_lib

DATA_AXIS = 'data'


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with a 'data' axis over all devices of all hosts (or the given ones)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def make_sample_fn(
  model: nn.Module,
  diffusion: diffusion_lib.GaussianDiffusion,
  mesh: Mesh,
  *,
  image_shape: tuple[int, int, int],
  num_samples: int,
  clip_denoised: bool = True,
) -> Callable[[Any, jax.Array], jax.Array]:
  """Returns a jitted ``sample(params, rng) -> [num_samples, H, W, C]`` sharded over ``mesh``.

  ``num_samples`` is rounded up to a multiple of the device count; each device runs the whole
  reverse chain on its own share with the key ``fold_in(rng, device index)``.
  """
  num_devices = mesh.devices.size
  per_device = -(-num_samples // num_devices)

  def per_device_sample(params, rng):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(DATA_AXIS))
    model_fn = lambda x, t: model.apply({'params': params}, x, t, train=False)
    return diffusion.p_sample_loop(
      model_fn, (per_device, *image_shape), rng, clip_denoised=clip_denoised
    )

  sharded = jax.shard_map(per_device_sample, mesh=mesh, in_specs=(P(), P()), out_specs=P(DATA_AXIS))
  return jax.jit(sharded)


def gather_images(samples: jax.Array, num_samples: int) -> np.ndarray:
  """Samples in [-1, 1] on any devices → uint8 numpy [num_samples, H, W, C] on every host."""
  images = np.asarray(multihost_utils.process_allgather(samples, tiled=True))[:num_samples]
  return to_uint8(images)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats → uint8 [0, 255], rounding as the data was quantized."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, *, padding: int = 2) -> np.ndarray:
  """uint8 [N, H, W, C] → one uint8 [rows*(H+p)+p, cols*(W+p)+p, C] grid, near-square."""
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), np.uint8)
  for k, image in enumerate(images):
    y, x = padding + (k // cols) * (h + padding), padding + (k % cols) * (w + padding)
    grid[y : y + h, x : x + w] = image
  return grid


def save_png(path: epath.PathLike, image: np.ndarray, *, min_size: int = 256) -> None:
  """Writes a uint8 [H, W, C] image as PNG, upscaled (nearest) so its short side is ≥ min_size."""
  scale = max(1, -(-min_size // min(image.shape[:2])))
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  pil = pil.resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    pil.save(f, format='PNG')
