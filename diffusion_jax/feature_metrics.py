"""Metrics of a network's outputs, whatever the network: streaming feature statistics, the
Fréchet distance between two of them, their ``.npz`` file, and the Inception score of logits.

FID is the Fréchet distance of Inception pool3 statistics (``fid`` re-exports these names); the
digits metric uses the same functions on its classifier's features.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.special
from absl import logging
from etils import epath

from diffusion_jax import npz


class FeatureStats:
  """Streaming float64 mean and covariance of features (sums of x and x x^T, shifted by the
  first batch). ``dim`` defaults to the FID Inception's pool3 width."""

  def __init__(self, dim: int = 2048):
    self.dim = dim
    self.num = 0
    self._shift = np.zeros(dim)
    self._sum = np.zeros(dim)
    self._outer = np.zeros((dim, dim))

  def update(self, features: np.ndarray) -> None:
    """Adds a batch of features of shape (n, dim)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f'expected features of shape (n, {self.dim}), got {x.shape}')
    if not len(x):
      return
    if self.num == 0:  # shifting by a typical value keeps the one-pass covariance accurate
      self._shift = x.mean(axis=0)
    x = x - self._shift
    self.num += len(x)
    self._sum += x.sum(axis=0)
    self._outer += x.T @ x

  def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
    """Mean (dim,) and unbiased covariance (dim, dim), as np.mean / np.cov(rowvar=False)."""
    if self.num < 2:
      raise ValueError(f'a covariance needs at least 2 feature vectors, got {self.num}')
    centered_mean = self._sum / self.num
    cov = (self._outer - self.num * np.outer(centered_mean, centered_mean)) / (self.num - 1)
    return self._shift + centered_mean, cov


def _sqrtm_of_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> np.ndarray:
  """Real sqrtm(sigma1 @ sigma2), retried with eps*I added to both when the product is near
  singular."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning(
      'FID: sqrtm of a near-singular covariance product; adding %g to both diagonals.', eps
    )
    offset = eps * np.eye(len(sigma1))
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(covmean).all():
      raise ValueError(
        f'FID: sqrtm(sigma1 @ sigma2) is not finite even with eps={eps}; check the '
        'covariances for NaN/inf or use a larger eps.'
      )
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(
        f'FID: sqrtm(sigma1 @ sigma2) has a large imaginary part (max '
        f'{np.max(np.abs(covmean.imag)):.3g}); the covariances are not positive '
        'semi-definite enough: use more samples than feature dimensions or a larger eps.'
      )
    covmean = covmean.real
  return covmean


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
  """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), in float64."""
  mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
  sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(
      f'frechet_distance needs means (d,) and covariances (d, d) of one d, got '
      f'{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}'
    )
  diff = mu1 - mu2
  covmean = _sqrtm_of_product(sigma1, sigma2, eps)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
  """Inception score (mean, std over ``num_splits`` splits) from the 1008-way logits, as OpenAI's
  IS code."""
  logits = np.asarray(logits, np.float64)
  n = len(logits)
  if logits.ndim != 2 or n < num_splits:
    raise ValueError(f'expected logits of shape (n >= {num_splits}, classes), got {logits.shape}')
  probs = scipy.special.softmax(logits, axis=1)
  scores = []
  for i in range(num_splits):
    part = probs[i * n // num_splits : (i + 1) * n // num_splits]
    kl = scipy.special.rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


def save_stats(path: epath.PathLike, mu: np.ndarray, sigma: np.ndarray, num_images: int) -> None:
  """Writes statistics to ``.npz`` (``mu``, ``sigma``, ``num_images``; float64, int64) on any
  epath, atomically."""
  npz.write(
    path,
    {
      'mu': np.asarray(mu, np.float64),
      'sigma': np.asarray(sigma, np.float64),
      'num_images': np.int64(num_images),
    },
  )


def load_stats(path: epath.PathLike) -> tuple[np.ndarray, np.ndarray, int | None]:
  """(mu, sigma, num_images) of an ``.npz`` on any epath; num_images is None in files without it
  (TTUR's, pytorch-fid's)."""
  if not epath.Path(path).exists():
    raise FileNotFoundError(
      f'no FID statistics at {str(path)!r}; compute them over the reference images '
      'with FeatureStats and write them with save_stats'
    )
  arrays = npz.read(path)
  if 'mu' not in arrays or 'sigma' not in arrays:
    raise ValueError(
      f'{str(path)!r} is not an FID statistics file: it has {sorted(arrays)}, needs mu and sigma'
    )
  num_images = int(arrays['num_images']) if 'num_images' in arrays else None
  return np.asarray(arrays['mu'], np.float64), np.asarray(arrays['sigma'], np.float64), num_images
