"""Closed-form reference for Gaussian data: the analytic-optimal ε-model and its expected bound.

Shared by test_diffusion.py (the bound in one process), test_evaluators_bound.py (sharded) and
test_samplers.py (the closed-form moments of samplers that skip steps).
"""

import math

import jax.numpy as jnp
import numpy as np
from scipy import special, stats

# Data x_0 ~ N(mu, s^2) per dimension. Then x_t ~ N(√ᾱ mu, ᾱ s² + 1 − ᾱ) and
# E[ε | x_t] = √(1−ᾱ) (x_t − √ᾱ mu) / (ᾱ s² + 1 − ᾱ): the optimal ε-prediction is linear in x_t,
# and its expected L_simple per dimension is Var(ε | x_t) = ᾱ s² / (ᾱ s² + 1 − ᾱ).

MU, S = 0.2, 0.3


def optimal_eps_fn(alphas_cumprod: np.ndarray, mu: float = MU, s: float = S, slope_scale=1.0):
  ac = jnp.asarray(alphas_cumprod, jnp.float32)

  def model_fn(x, t):
    a = ac[t].reshape((-1,) + (1,) * (x.ndim - 1))
    return slope_scale * jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * s**2 + 1 - a)

  return model_fn


def discretized_entropy_bits(mu: float, s: float) -> float:
  """Entropy of N(mu, s²) quantized to the 256 bins of Eq. 13, edge bins open."""
  edges = np.concatenate([[-np.inf], (np.arange(255) + 0.5) / 127.5 - 1, [np.inf]])
  p = np.diff(stats.norm.cdf(edges, mu, s))
  p = p[p > 0]
  return float(-(p * np.log2(p)).sum())


def expected_bound_bits(betas: np.ndarray, mu: float, s: float) -> float:
  """E[L_T + Σ L_{t-1} + L_0] of the optimal linear ε-model, fixedsmall, no clipping, in bits/dim.

  With x_0 ~ N(mu, s²) the model's x̂_0 = E[x_0 | x_t], so μ̃_t − μ_θ = coef1_t (x_0 − E[x_0 | x_t])
  and each KL is coef1_t² Var(x_0 | x_t) / (2 β̃_t). The decoder L_0 is the mass of the bin of
  width 2/255 under N(x̂_0, β̃ of the second step), with x_0 − x̂_0 ~ N(0, Var(x_0 | x_1)).
  """
  alphas_cumprod = np.cumprod(1 - betas)
  ac_prev = np.append(1.0, alphas_cumprod[:-1])
  beta_tilde = betas * (1 - ac_prev) / (1 - alphas_cumprod)
  var_x0 = s**2 * (1 - alphas_cumprod) / (alphas_cumprod * s**2 + 1 - alphas_cumprod)
  coef1 = betas * np.sqrt(ac_prev) / (1 - alphas_cumprod)
  ac_T = alphas_cumprod[-1]
  prior = 0.5 * (-1 - math.log(1 - ac_T) + (1 - ac_T) + ac_T * (mu**2 + s**2))
  kls = np.sum(0.5 * coef1[1:] ** 2 * var_x0[1:] / beta_tilde[1:])
  nodes, weights = np.polynomial.hermite_e.hermegauss(40)
  err = -np.abs(nodes) * math.sqrt(var_x0[0])
  scale, half_bin = math.sqrt(beta_tilde[1]), 1 / 255
  upper, lower = (
    special.log_ndtr((err + half_bin) / scale),
    special.log_ndtr((err - half_bin) / scale),
  )
  decoder = -np.sum(weights / weights.sum() * (upper + np.log1p(-np.exp(lower - upper))))
  return (prior + kls + decoder) / math.log(2)


def _optimal_predictions(a: float) -> tuple[float, float, float, float]:
  """(p, q, c, e) with x̂_0 = p x_t + q and ε̂ = c x_t + e for the optimal model at ᾱ = a."""
  c = math.sqrt(1 - a) / (a * S**2 + 1 - a)
  return (
    (1 - math.sqrt(1 - a) * c) / math.sqrt(a),
    math.sqrt(1 - a) * c * MU,
    c,
    -c * math.sqrt(a) * MU,
  )


def sampler_moments(
  alphas_cumprod: np.ndarray,
  steps,
  *,
  sampler: str,
  var: str = 'fixedsmall',
  eta: float = 0.0,
  start=(0.0, 1.0),
):
  """Mean and variance of the x_0 a sampler draws from x_T ~ N(0, 1) with the optimal ε, float64.

  The sampler runs over the original timesteps ``steps`` (increasing; the respaced process has
  ᾱ'_i = ᾱ_{steps[i]}), without clipping: 'ancestral' (Algorithm 2 with σ² = β̃' for
  ``var='fixedsmall'`` or β' for 'fixedlarge') or 'ddim' (Eq. 12 with σ² = η² β̃'). With ε*
  affine in x_t, x̂_0 and ε̂ are affine in x_t too, so each step is x -> A x + B + σ z.
  ``start=(x_T, 0.0)`` instead maps given x_T (arrays elementwise) through η = 0 DDIM.
  """
  a_all = np.asarray(alphas_cumprod, np.float64)[np.asarray(steps)]
  mean, variance = start
  for i in reversed(range(len(a_all))):
    a, a_prev = a_all[i], (a_all[i - 1] if i > 0 else 1.0)
    p, q, c, e = _optimal_predictions(a)
    beta = 1 - a / a_prev
    beta_tilde = beta * (1 - a_prev) / (1 - a)
    if sampler == 'ddim':
      step_var = eta**2 * beta_tilde
      k = math.sqrt(1 - a_prev - step_var)
      slope, offset = math.sqrt(a_prev) * p + k * c, math.sqrt(a_prev) * q + k * e
    else:
      coef1, coef2 = (
        beta * math.sqrt(a_prev) / (1 - a),
        (1 - a_prev) * math.sqrt(1 - beta) / (1 - a),
      )
      slope, offset = coef1 * p + coef2, coef1 * q
      step_var = beta_tilde if var == 'fixedsmall' else beta
    mean, variance = slope * mean + offset, slope**2 * variance + (step_var if i > 0 else 0.0)
  return mean, variance


def ddim_encoder_map(alphas_cumprod: np.ndarray, steps) -> tuple[float, float]:
  """The DDIM encoder x_0 -> x_T with the optimal ε as x_T = slope x_0 + offset, in float64.

  Step i goes from ᾱ_{steps[i-1]} (1 at i = 0) to ᾱ_{steps[i]} with ε̂ of the model at the
  target step but the current x: x_i = √ᾱ_i (x − √(1−ᾱ_{i−1}) ε̂) / √ᾱ_{i−1} + √(1−ᾱ_i) ε̂.
  """
  a_all = np.asarray(alphas_cumprod, np.float64)[np.asarray(steps)]
  slope, offset = 1.0, 0.0
  for i, a in enumerate(a_all):
    a_prev = a_all[i - 1] if i > 0 else 1.0
    _, _, c, e = _optimal_predictions(a)
    r, k = math.sqrt(a / a_prev), math.sqrt(a / a_prev) * math.sqrt(1 - a_prev) - math.sqrt(1 - a)
    step_slope, step_offset = r - k * c, -k * e  # r x - k (c x + e)
    slope, offset = step_slope * slope, step_slope * offset + step_offset
  return slope, offset
