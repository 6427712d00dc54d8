"""Images between the model's [-1, 1] floats and 8-bit pixels, and PNG grids of them."""

import io
import math

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image


def to_pixels(images):
  """[-1, 1] -> floats on the 0..255 grid, rounded as the data was quantized (numpy or JAX)."""
  xp = jnp if isinstance(images, jax.Array) else np
  return xp.clip(xp.round((images + 1.0) * 127.5), 0.0, 255.0)


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 numpy [0, 255]."""
  return to_pixels(np.asarray(images, np.float32)).astype(np.uint8)


def from_pixels(pixels):
  """Pixel values in [0, 255] (float) -> [-1, 1] as x / 127.5 - 1 (numpy, JAX or TF)."""
  return pixels / 127.5 - 1.0


def image_grid(images: np.ndarray, *, padding: int = 2, columns: int | None = None) -> np.ndarray:
  """uint8 [N, H, W, C] -> one uint8 [rows*(H+p)+p, cols*(W+p)+p, C] grid, near-square unless
  ``columns`` is given (row by row)."""
  n, h, w, c = images.shape
  cols = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), np.uint8)
  for k, image in enumerate(images):
    y, x = padding + (k // cols) * (h + padding), padding + (k % cols) * (w + padding)
    grid[y : y + h, x : x + w] = image
  return grid


def png_bytes(image: np.ndarray, *, min_size: int = 256) -> bytes:
  """A uint8 [H, W, C] image as PNG, upscaled (nearest) so its short side is >= min_size."""
  scale = max(1, -(-min_size // min(image.shape[:2])))
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  pil = pil.resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
  buffer = io.BytesIO()
  pil.save(buffer, format='PNG')
  return buffer.getvalue()


def save_png(path: epath.PathLike, image: np.ndarray, *, min_size: int = 256) -> None:
  """Writes ``png_bytes(image)`` at ``path``, making its folder."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(png_bytes(image, min_size=min_size))
