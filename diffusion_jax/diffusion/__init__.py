"""The DDPM diffusion process (Ho, Jain & Abbeel 2020) as pure functions over arrays.

Names follow the original release (diffusion_tf/diffusion_utils_2.py). Timesteps are 0-based:
code step ``t = 0`` is the paper's ``t = 1`` and ``t = T - 1`` is the paper's ``t = T``.

- ``schedules``: the β_t of Eq. 2 and iDDPM's respacing, in float64;
- ``distributions``: the Gaussian KLs of Eq. 5 and the discretized decoder of Eq. 13;
- ``process``: ``GaussianDiffusion``, a pytree: q, the posteriors, p_θ, the losses and the bound;
- ``samplers``: its reverse-chain samplers (Algorithm 2, from x_T or any x_t; DDIM; DDIM
  inversion), one compiled scan each.
"""

from diffusion_jax.diffusion.distributions import (
  discretized_gaussian_log_likelihood,
  mean_flat,
  normal_kl,
)
from diffusion_jax.diffusion.process import (
  LOSS_TYPES,
  MEAN_TYPES,
  VAR_TYPES,
  GaussianDiffusion,
  LossType,
  MeanType,
  VarType,
)
from diffusion_jax.diffusion.samplers import ModelFn
from diffusion_jax.diffusion.schedules import BETA_SCHEDULES, get_beta_schedule

__all__ = [
  'BETA_SCHEDULES',
  'LOSS_TYPES',
  'MEAN_TYPES',
  'VAR_TYPES',
  'GaussianDiffusion',
  'LossType',
  'MeanType',
  'ModelFn',
  'VarType',
  'discretized_gaussian_log_likelihood',
  'get_beta_schedule',
  'mean_flat',
  'normal_kl',
]
