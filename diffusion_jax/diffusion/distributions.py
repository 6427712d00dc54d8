"""The Gaussians of the bound: KL divergences (Eq. 5) and the discretized decoder (Eq. 13)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr

HALF_BIN = 1.0 / 255.0  # half the width of one of the 256 bins of 8-bit data scaled to [-1, 1]


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over every axis but the batch axis."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(
  mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array
) -> jax.Array:
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (the terms of Eq. 5)."""
  ratio = jnp.exp(logvar1 - logvar2)
  return 0.5 * (-1.0 + logvar2 - logvar1 + ratio + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(
  x: jax.Array, *, means: jax.Array, log_scales: jax.Array
) -> jax.Array:
  """log p(x) of Eq. 13: the Gaussian's mass on x's bin of width 2/255 in [-1, 1], edge bins open.

  ``x`` holds the 256 values of 8-bit data scaled to [-1, 1]. The bin mass is taken on the
  side of the mean where both CDFs are small, so it keeps its precision far in the tails."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  plus_in = inv_stdv * (centered + HALF_BIN)  # the bin's upper edge, standardized
  min_in = inv_stdv * (centered - HALF_BIN)  # its lower edge
  upper_tail = ndtr(-min_in) - ndtr(-plus_in)
  lower_tail = ndtr(plus_in) - ndtr(min_in)
  cdf_delta = jnp.where(centered > 0, upper_tail, lower_tail)
  log_cdf_delta = jnp.log(jnp.maximum(cdf_delta, 1e-12))
  log_not_first = jnp.where(x > 0.999, log_ndtr(-min_in), log_cdf_delta)  # 1 − CDF(min) in log
  return jnp.where(x < -0.999, log_ndtr(plus_in), log_not_first)
