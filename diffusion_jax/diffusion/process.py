"""``GaussianDiffusion``: the forward process q, the reverse process p_θ, their losses and bound.

The per-step constants are computed from β_t in float64 numpy and cast once to float32; they and
``timestep_map`` are the pytree's leaves, while the three types and β_t itself (exact, as Python
floats, the input of ``respaced``) are static. So the process can be closed over or passed into
``jax.jit``, and respacing gives the same process before and after. Nothing here holds a network:
every method takes a ``model_fn(x_t, t)`` or its output.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion.distributions import (
  discretized_gaussian_log_likelihood,
  mean_flat,
  normal_kl,
)
from diffusion_jax.diffusion.samplers import ModelFn, Samplers
from diffusion_jax.diffusion.schedules import get_beta_schedule, respaced_betas, space_timesteps

MeanType = Literal['eps', 'xstart', 'xprev', 'v']
VarType = Literal['fixedsmall', 'fixedlarge']
LossType = Literal['mse', 'kl']

MEAN_TYPES = ('eps', 'xstart', 'xprev', 'v')
VAR_TYPES = ('fixedsmall', 'fixedlarge')
LOSS_TYPES = ('mse', 'kl')

STATIC = {'static': True}  # the metadata of a field that is part of the treedef, not a leaf


def _float32(a: np.ndarray) -> jax.Array:
  """A float64 constant cast once to float32."""
  return jnp.asarray(a, dtype=jnp.float32)


def _extract(a: jax.Array, t: jax.Array, x_shape: tuple[int, ...]) -> jax.Array:
  """``a[t]`` for a batch of timesteps, shaped to broadcast against ``x_shape``."""
  return jnp.take(a, t, axis=0).reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(init=False, repr=False, eq=False)
class GaussianDiffusion(Samplers):
  """The forward process q, the reverse process p_θ, their losses, bound and samplers.

  Args:
    betas: β_t for t = 1..T (float64 from ``get_beta_schedule``).
    model_mean_type: what the network predicts: 'eps' (ε, Eq. 11), 'xstart' (x_0),
      'xprev' (μ of x_{t-1}), or 'v' (√ᾱ ε − √(1−ᾱ) x_0, Salimans & Ho 2022).
    model_var_type: Σ_θ = σ_t² I with 'fixedsmall' (β̃_t) or 'fixedlarge' (β_t; as in
      the original, its log-variance at the first step is that of β̃ at the second).
    loss_type: 'mse' (L_simple, Eq. 14, against the mean type's target) or 'kl' (Eq. 5, bits/dim).
    timestep_map: the timestep the model sees at each step (``respaced``); default arange(T).
  """

  # Static: the types and β_t exactly (float64 values as a hashable tuple).
  model_mean_type: MeanType = dataclasses.field(metadata=STATIC)
  model_var_type: VarType = dataclasses.field(metadata=STATIC)
  loss_type: LossType = dataclasses.field(metadata=STATIC)
  betas64: tuple[float, ...] = dataclasses.field(metadata=STATIC)
  # Leaves: the constants of Eqs. 4, 6 and 7 in float32, indexed by code step t.
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  model_variance: jax.Array
  model_log_variance: jax.Array
  # Leaf: the timestep the model sees at each step (int32).
  timestep_map: jax.Array

  def __init__(
    self,
    betas: np.ndarray,
    model_mean_type: MeanType = 'eps',
    model_var_type: VarType = 'fixedlarge',
    loss_type: LossType = 'mse',
    timestep_map: np.ndarray | jax.Array | None = None,
  ):
    for name, value, allowed in (
      ('model_mean_type', model_mean_type, MEAN_TYPES),
      ('model_var_type', model_var_type, VAR_TYPES),
      ('loss_type', loss_type, LOSS_TYPES),
    ):
      if value not in allowed:
        raise ValueError(f'Unknown {name} {value!r}; choose one of {allowed}.')
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
      raise ValueError('betas must be a 1-D array of values in (0, 1].')
    self.model_mean_type = model_mean_type
    self.model_var_type = model_var_type
    self.loss_type = loss_type
    self.betas64 = tuple(betas.tolist())

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # β̃ at the first step is 0; its log is clipped to the second step's value.
    second_step_variance = posterior_variance[1:2]
    posterior_log_variance_clipped = np.log(np.append(second_step_variance, posterior_variance[1:]))
    self.betas = _float32(betas)
    self.alphas_cumprod = _float32(alphas_cumprod)
    self.alphas_cumprod_prev = _float32(alphas_cumprod_prev)
    self.sqrt_alphas_cumprod = _float32(np.sqrt(alphas_cumprod))
    self.sqrt_one_minus_alphas_cumprod = _float32(np.sqrt(1.0 - alphas_cumprod))
    self.log_one_minus_alphas_cumprod = _float32(np.log(1.0 - alphas_cumprod))
    self.sqrt_recip_alphas_cumprod = _float32(np.sqrt(1.0 / alphas_cumprod))
    self.sqrt_recipm1_alphas_cumprod = _float32(np.sqrt(1.0 / alphas_cumprod - 1.0))
    self.posterior_variance = _float32(posterior_variance)
    self.posterior_log_variance_clipped = _float32(posterior_log_variance_clipped)
    self.posterior_mean_coef1 = _float32(
      betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    )
    self.posterior_mean_coef2 = _float32(
      (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)
    )
    if model_var_type == 'fixedlarge':
      self.model_variance = _float32(betas)
      self.model_log_variance = _float32(np.log(np.append(second_step_variance, betas[1:])))
    else:
      self.model_variance = _float32(posterior_variance)
      self.model_log_variance = _float32(posterior_log_variance_clipped)
    steps = np.arange(betas.shape[0]) if timestep_map is None else timestep_map
    self.timestep_map = jnp.asarray(steps, dtype=jnp.int32)

  @classmethod
  def from_config(cls, config: Any) -> GaussianDiffusion:
    """Builds the process from a ``config.diffusion`` ConfigDict."""
    betas = get_beta_schedule(
      config.beta_schedule,
      beta_start=config.beta_start,
      beta_end=config.beta_end,
      num_diffusion_timesteps=config.num_diffusion_timesteps,
    )
    return cls(betas, config.model_mean_type, config.model_var_type, config.loss_type)

  def tree_flatten(self) -> tuple[tuple[jax.Array, ...], tuple[Any, ...]]:
    """Leaves: the float32 constants and ``timestep_map``; static: the types and ``betas64``."""
    leaves = tuple(getattr(self, field.name) for field in _LEAF_FIELDS)
    static = tuple(getattr(self, field.name) for field in _STATIC_FIELDS)
    return leaves, static

  @classmethod
  def tree_unflatten(
    cls, static: tuple[Any, ...], leaves: tuple[jax.Array, ...]
  ) -> GaussianDiffusion:
    """The process of ``tree_flatten``'s parts, without recomputing the constants."""
    obj = object.__new__(cls)
    for field, value in zip((*_STATIC_FIELDS, *_LEAF_FIELDS), (*static, *leaves)):
      setattr(obj, field.name, value)
    return obj

  @property
  def num_timesteps(self) -> int:
    """T, the number of steps of this process."""
    return len(self.betas64)

  def respaced(self, num_steps: int) -> GaussianDiffusion:
    """iDDPM respacing: steps t_i = round(i (T−1)/(k−1)), β'_i = 1 − ᾱ_{t_i} / ᾱ_{t_{i−1}}."""
    steps = space_timesteps(self.num_timesteps, num_steps)
    betas = respaced_betas(np.asarray(self.betas64, dtype=np.float64), steps)
    return type(self)(
      betas,
      self.model_mean_type,
      self.model_var_type,
      self.loss_type,
      timestep_map=self.timestep_map[steps],
    )

  def q_mean_variance(
    self, x_start: jax.Array, t: jax.Array
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and log-variance of q(x_t | x_0) (Eq. 4)."""
    mean = _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
    variance = _extract(jnp.square(self.sqrt_one_minus_alphas_cumprod), t, x_start.shape)
    log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
    return mean, variance, log_variance

  def q_sample(self, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, a draw from q(x_t | x_0) (Eq. 4)."""
    sqrt_ab = _extract(self.sqrt_alphas_cumprod, t, x_start.shape)
    sqrt_one_minus_ab = _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape)
    return sqrt_ab * x_start + sqrt_one_minus_ab * noise

  def q_posterior_mean_variance(
    self, x_start: jax.Array, x_t: jax.Array, t: jax.Array
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean μ̃_t, variance β̃_t and clipped log-variance of q(x_{t-1} | x_t, x_0) (Eqs. 6–7)."""
    coef1 = _extract(self.posterior_mean_coef1, t, x_t.shape)
    mean = coef1 * x_start + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
    variance = _extract(self.posterior_variance, t, x_t.shape)
    log_variance = _extract(self.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance

  def predict_start_from_noise(self, x_t: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t, inverting Eq. 4."""
    sqrt_recip_ab = _extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape)
    return sqrt_recip_ab * x_t - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise

  def predict_start_from_prev(self, x_t: jax.Array, t: jax.Array, x_prev: jax.Array) -> jax.Array:
    """x_0 from the posterior mean μ̃_t, inverting Eq. 7."""
    coef2 = _extract(self.posterior_mean_coef2, t, x_t.shape)
    return (x_prev - coef2 * x_t) / _extract(self.posterior_mean_coef1, t, x_t.shape)

  def predict_start_from_v(self, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x_0 = √ᾱ_t x_t − √(1−ᾱ_t) v (Salimans & Ho 2022)."""
    sqrt_ab = _extract(self.sqrt_alphas_cumprod, t, x_t.shape)
    return sqrt_ab * x_t - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v

  def predict_noise_from_start(
    self, x_t: jax.Array, t: jax.Array, pred_xstart: jax.Array
  ) -> jax.Array:
    """ε = (x_t / √ᾱ_t − x_0) / √(1/ᾱ_t − 1), inverting Eq. 4 for the noise."""
    sqrt_recip_ab = _extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape)
    sqrt_recipm1_ab = _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)
    return (sqrt_recip_ab * x_t - pred_xstart) / sqrt_recipm1_ab

  def p_mean_variance(
    self, model_output: jax.Array, x_t: jax.Array, t: jax.Array, clip_denoised: bool = True
  ) -> dict[str, jax.Array]:
    """Mean, variance and log-variance of p_θ(x_{t-1} | x_t) (Eq. 1), and the predicted x_0."""
    variance = _extract(self.model_variance, t, x_t.shape) * jnp.ones_like(x_t)
    log_variance = _extract(self.model_log_variance, t, x_t.shape) * jnp.ones_like(x_t)
    if self.model_mean_type == 'eps':
      pred_xstart = self.predict_start_from_noise(x_t, t, model_output)
    elif self.model_mean_type == 'v':
      pred_xstart = self.predict_start_from_v(x_t, t, model_output)
    elif self.model_mean_type == 'xprev':
      pred_xstart = self.predict_start_from_prev(x_t, t, model_output)
    else:  # 'xstart': the output is x_0
      pred_xstart = model_output
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    if self.model_mean_type == 'xprev':
      mean = model_output
    else:
      mean = self.q_posterior_mean_variance(pred_xstart, x_t, t)[0]
    return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)

  def p_sample(
    self,
    model_fn: ModelFn,
    x_t: jax.Array,
    t: jax.Array,
    rng: jax.Array,
    clip_denoised: bool = True,
  ) -> tuple[jax.Array, jax.Array]:
    """One step of Algorithm 2: x_{t-1} ~ p_θ(x_{t-1} | x_t), with no noise at t = 0; and x̂_0."""
    out = self.p_mean_variance(model_fn(x_t, self.timestep_map[t]), x_t, t, clip_denoised)
    noise = jax.random.normal(rng, x_t.shape, x_t.dtype)
    nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return out['mean'] + nonzero * jnp.exp(0.5 * out['log_variance']) * noise, out['pred_xstart']

  def training_losses(
    self, model_fn: ModelFn, x_start: jax.Array, t: jax.Array, noise: jax.Array
  ) -> jax.Array:
    """Per-example loss: L_simple (Eq. 14, mean over dims) or the bound's term in bits/dim."""
    x_t = self.q_sample(x_start, t, noise)
    model_output = model_fn(x_t, self.timestep_map[t])
    if self.loss_type == 'kl':
      return self.vb_terms_bpd(model_output, x_start, x_t, t, clip_denoised=False)[0]
    if self.model_mean_type == 'eps':
      target = noise
    elif self.model_mean_type == 'xstart':
      target = x_start
    elif self.model_mean_type == 'xprev':
      target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
    else:  # 'v' = √ᾱ_t ε − √(1−ᾱ_t) x_0
      target = self.q_sample(noise, t, -x_start)
    return mean_flat(jnp.square(target - model_output))

  def vb_terms_bpd(
    self,
    model_output: jax.Array,
    x_start: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    clip_denoised: bool = True,
  ) -> tuple[jax.Array, jax.Array]:
    """Per-example L_{t-1} (Eq. 5) for t > 0, decoder NLL L_0 (Eq. 13) at t = 0, bits/dim; x̂_0."""
    true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, out['mean'], out['log_variance']))
    log_p = discretized_gaussian_log_likelihood(
      x_start, means=out['mean'], log_scales=0.5 * out['log_variance']
    )
    return jnp.where(t == 0, -mean_flat(log_p), kl) / math.log(2.0), out['pred_xstart']

  def prior_bpd(self, x_start: jax.Array) -> jax.Array:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per example, in bits/dim."""
    t = jnp.full((x_start.shape[0],), self.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = self.q_mean_variance(x_start, t)
    return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

  def calc_bpd_loop(
    self, model_fn: ModelFn, x_start: jax.Array, rng: jax.Array, clip_denoised: bool = True
  ) -> dict[str, jax.Array]:
    """The full bound of Eq. 5 in bits/dim over all T terms, one compiled scan.

    Returns per-example ``total_bpd`` [B], ``prior_bpd`` [B] (L_T), ``terms_bpd`` [B, T]
    (column t is L_t for t > 0 and L_0 at t = 0), and ``xstart_mse`` and ``mse`` (of ε) [B, T]."""

    def term(_: None, t_scalar: jax.Array) -> tuple[None, tuple[jax.Array, ...]]:
      t = jnp.full((x_start.shape[0],), t_scalar, dtype=jnp.int32)
      noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x_start.shape, x_start.dtype)
      x_t = self.q_sample(x_start, t, noise)
      model_output = model_fn(x_t, self.timestep_map[t])
      bpd, pred_xstart = self.vb_terms_bpd(model_output, x_start, x_t, t, clip_denoised)
      pred_eps = self.predict_noise_from_start(x_t, t, pred_xstart)
      xstart_mse = mean_flat(jnp.square(pred_xstart - x_start))
      return None, (bpd, xstart_mse, mean_flat(jnp.square(pred_eps - noise)))

    _, outs = jax.lax.scan(term, None, jnp.arange(self.num_timesteps, dtype=jnp.int32))
    terms, xstart_mse, mse = (a.T for a in outs)  # [B, T]: column t at index t
    prior = self.prior_bpd(x_start)
    total = jnp.sum(terms, axis=1) + prior
    return dict(total_bpd=total, prior_bpd=prior, terms_bpd=terms, xstart_mse=xstart_mse, mse=mse)


_STATIC_FIELDS = tuple(f for f in dataclasses.fields(GaussianDiffusion) if f.metadata == STATIC)
_LEAF_FIELDS = tuple(f for f in dataclasses.fields(GaussianDiffusion) if f.metadata != STATIC)
