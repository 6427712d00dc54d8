"""The DDPM diffusion process (Ho, Jain & Abbeel 2020) as pure functions over arrays.

Names follow the original release (diffusion_tf/diffusion_utils_2.py). Timesteps are
0-based: code step ``t = 0`` is the paper's ``t = 1`` and ``t = T - 1`` is the paper's
``t = T``. Schedule arithmetic is float64 numpy, cast once to float32.

``GaussianDiffusion`` is a pytree (its schedule arrays are leaves, its types static),
so it can be closed over or passed into ``jax.jit``. Nothing here holds a network:
every method takes a ``model_fn(x_t, t)`` or its output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]
MeanType = Literal['eps', 'xstart', 'xprev', 'v']
VarType = Literal['fixedsmall', 'fixedlarge']
LossType = Literal['mse', 'kl']

MEAN_TYPES = ('eps', 'xstart', 'xprev', 'v')
VAR_TYPES = ('fixedsmall', 'fixedlarge')
LOSS_TYPES = ('mse', 'kl')
BETA_SCHEDULES = ('linear', 'quad', 'const', 'jsd', 'warmup10', 'warmup50', 'cosine')


# ----------------------------------------------------------------------------- schedules
def _warmup_beta(
  beta_start: float, beta_end: float, num_diffusion_timesteps: int, warmup_frac: float
) -> np.ndarray:
  """Linear warm-up over the first ``warmup_frac`` of the steps, then constant ``beta_end``."""
  betas = beta_end * np.ones(num_diffusion_timesteps, dtype=np.float64)
  warmup_time = int(num_diffusion_timesteps * warmup_frac)
  betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
  return betas


def _cosine_betas(
  num_diffusion_timesteps: int, s: float = 0.008, max_beta: float = 0.999
) -> np.ndarray:
  """Nichol & Dhariwal (2021) Eq. 17: alphas_cumprod = cos²((t/T + s)/(1 + s)·π/2)."""
  steps = np.arange(num_diffusion_timesteps + 1, dtype=np.float64) / num_diffusion_timesteps
  alphas_cumprod = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
  return np.minimum(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], max_beta)


def get_beta_schedule(
  kind: str, *, beta_start: float, beta_end: float, num_diffusion_timesteps: int
) -> np.ndarray:
  """The β_t of Eq. 2 as float64; the paper's is ``linear`` 1e-4..0.02, T=1000. ``cosine``
  ignores ``beta_start``/``beta_end``."""
  n = num_diffusion_timesteps
  if n < 1:
    raise ValueError(f'num_diffusion_timesteps must be >= 1, got {n}.')
  if kind not in BETA_SCHEDULES:
    raise ValueError(f'Unknown beta schedule {kind!r}; choose one of {BETA_SCHEDULES}.')
  make_betas = {
    'linear': lambda: np.linspace(beta_start, beta_end, n, dtype=np.float64),
    'quad': lambda: np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2,
    'const': lambda: beta_end * np.ones(n, dtype=np.float64),
    'jsd': lambda: 1.0 / np.linspace(n, 1, n, dtype=np.float64),  # 1/T, 1/(T-1), ..., 1
    'warmup10': lambda: _warmup_beta(beta_start, beta_end, n, 0.1),
    'warmup50': lambda: _warmup_beta(beta_start, beta_end, n, 0.5),
    'cosine': lambda: _cosine_betas(n),
  }
  betas = make_betas[kind]()
  if not np.all((betas > 0) & (betas <= 1)):
    hint = f'check beta_start and beta_end (got {beta_start}, {beta_end})'
    raise ValueError(f'Betas of schedule {kind!r} must lie in (0, 1]; {hint}.')
  return betas


# ----------------------------------------------------------------------------- densities
def mean_flat(x: Array) -> Array:
  """Mean over every axis but the batch axis."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (the terms of Eq. 5)."""
  ratio = jnp.exp(logvar1 - logvar2)
  return 0.5 * (-1.0 + logvar2 - logvar1 + ratio + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Array, *, means: Array, log_scales: Array) -> Array:
  """log p(x) of Eq. 13: the Gaussian's mass on x's bin of width 2/255 in [-1, 1], edge bins open.

  ``x`` holds the 256 values of 8-bit data scaled to [-1, 1]. The bin mass is taken on the
  side of the mean where both CDFs are small, so it keeps its precision far in the tails.
  """
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  plus_in = inv_stdv * (centered + 1.0 / 255.0)
  min_in = inv_stdv * (centered - 1.0 / 255.0)
  log_cdf_plus = jax.scipy.special.log_ndtr(plus_in)
  log_one_minus_cdf_min = jax.scipy.special.log_ndtr(-min_in)
  ndtr = jax.scipy.special.ndtr
  cdf_delta = jnp.where(centered > 0, ndtr(-min_in) - ndtr(-plus_in), ndtr(plus_in) - ndtr(min_in))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_delta, 1e-12))
  log_not_first = jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
  return jnp.where(x < -0.999, log_cdf_plus, log_not_first)


def _extract(a: Array, t: Array, x_shape: tuple[int, ...]) -> Array:
  """``a[t]`` for a batch of timesteps, shaped to broadcast against ``x_shape``."""
  return jnp.take(a, t, axis=0).reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))


# ----------------------------------------------------------------------------- the process
@jax.tree_util.register_pytree_node_class
class GaussianDiffusion:
  """The forward process q, the reverse process p_θ, their losses, bound and sampler.

  Args:
    betas: β_t for t = 1..T (float64 from ``get_beta_schedule``).
    model_mean_type: what the network predicts: 'eps' (ε, Eq. 11), 'xstart' (x_0),
      'xprev' (μ of x_{t-1}), or 'v' (√ᾱ ε − √(1−ᾱ) x_0, Salimans & Ho 2022).
    model_var_type: Σ_θ = σ_t² I with 'fixedsmall' (β̃_t) or 'fixedlarge' (β_t; as in
      the original, its log-variance at the first step is that of β̃ at the second).
    loss_type: 'mse' (L_simple, Eq. 14, against the mean type's target) or 'kl' (the
      variational bound, Eq. 5, in bits/dim).
  """

  def __init__(
    self,
    betas: np.ndarray,
    model_mean_type: MeanType = 'eps',
    model_var_type: VarType = 'fixedlarge',
    loss_type: LossType = 'mse',
  ):
    self.model_mean_type, self.model_var_type = model_mean_type, model_var_type
    self.loss_type = loss_type
    allowed_types = dict(model_mean_type=MEAN_TYPES, model_var_type=VAR_TYPES, loss_type=LOSS_TYPES)
    for name, allowed in allowed_types.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f'Unknown {name} {getattr(self, name)!r}; choose one of {allowed}.')
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
      raise ValueError('betas must be a 1-D array of values in (0, 1].')
    schedule = self._schedule(betas, model_var_type)
    self._fields = tuple(schedule)
    for name, value in schedule.items():
      setattr(self, name, jnp.asarray(value, dtype=jnp.float32))

  @staticmethod
  def _schedule(betas: np.ndarray, model_var_type: str) -> dict[str, np.ndarray]:
    """Every per-step constant, in float64 (Eqs. 4, 6, 7)."""
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # β̃ at the first step is 0; its log is clipped to the second step's value.
    second_step_var = posterior_variance[1:2]
    posterior_log_variance_clipped = np.log(np.append(second_step_var, posterior_variance[1:]))
    if model_var_type == 'fixedlarge':
      model_variance, model_log_variance = betas, np.log(np.append(second_step_var, betas[1:]))
    else:
      model_variance, model_log_variance = posterior_variance, posterior_log_variance_clipped
    return dict(
      betas=betas,
      alphas_cumprod=alphas_cumprod,
      alphas_cumprod_prev=alphas_cumprod_prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
      log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=posterior_log_variance_clipped,
      posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
      posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
      model_variance=model_variance,
      model_log_variance=model_log_variance,
    )

  @classmethod
  def from_config(cls, config: Any) -> GaussianDiffusion:
    """Builds the process from a ``config.diffusion`` ConfigDict."""
    kw = {k: getattr(config, k) for k in ('beta_start', 'beta_end', 'num_diffusion_timesteps')}
    betas = get_beta_schedule(config.beta_schedule, **kw)
    return cls(betas, config.model_mean_type, config.model_var_type, config.loss_type)

  # Pytree protocol: schedule arrays are leaves, the three types are static.
  def tree_flatten(self):
    leaves = tuple(getattr(self, name) for name in self._fields)
    return leaves, (self.model_mean_type, self.model_var_type, self.loss_type, self._fields)

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    obj = object.__new__(cls)
    obj.model_mean_type, obj.model_var_type, obj.loss_type, obj._fields = aux
    for name, leaf in zip(obj._fields, leaves):
      setattr(obj, name, leaf)
    return obj

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  # --------------------------------------------------------------------------- q
  def q_mean_variance(self, x_start: Array, t: Array) -> tuple[Array, Array, Array]:
    """Mean, variance and log-variance of q(x_t | x_0) (Eq. 4)."""
    mean = _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
    variance = _extract(jnp.square(self.sqrt_one_minus_alphas_cumprod), t, x_start.shape)
    log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
    return mean, variance, log_variance

  def q_sample(self, x_start: Array, t: Array, noise: Array) -> Array:
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, a draw from q(x_t | x_0) (Eq. 4)."""
    sqrt_ab = _extract(self.sqrt_alphas_cumprod, t, x_start.shape)
    sqrt_one_minus_ab = _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape)
    return sqrt_ab * x_start + sqrt_one_minus_ab * noise

  def q_posterior_mean_variance(
    self, x_start: Array, x_t: Array, t: Array
  ) -> tuple[Array, Array, Array]:
    """Mean μ̃_t, variance β̃_t and clipped log-variance of q(x_{t-1} | x_t, x_0) (Eqs. 6–7)."""
    coef1 = _extract(self.posterior_mean_coef1, t, x_t.shape)
    mean = coef1 * x_start + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
    variance = _extract(self.posterior_variance, t, x_t.shape)
    log_variance = _extract(self.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance

  # --------------------------------------------------------------------------- p
  def predict_start_from_noise(self, x_t: Array, t: Array, noise: Array) -> Array:
    """x_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t, inverting Eq. 4."""
    sqrt_recip_ab = _extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape)
    return sqrt_recip_ab * x_t - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise

  def predict_start_from_prev(self, x_t: Array, t: Array, x_prev: Array) -> Array:
    """x_0 from the posterior mean μ̃_t, inverting Eq. 7."""
    coef2 = _extract(self.posterior_mean_coef2, t, x_t.shape)
    return (x_prev - coef2 * x_t) / _extract(self.posterior_mean_coef1, t, x_t.shape)

  def predict_start_from_v(self, x_t: Array, t: Array, v: Array) -> Array:
    """x_0 = √ᾱ_t x_t − √(1−ᾱ_t) v (Salimans & Ho 2022)."""
    sqrt_ab = _extract(self.sqrt_alphas_cumprod, t, x_t.shape)
    return sqrt_ab * x_t - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v

  def predict_noise_from_start(self, x_t: Array, t: Array, pred_xstart: Array) -> Array:
    """ε = (x_t / √ᾱ_t − x_0) / √(1/ᾱ_t − 1), inverting Eq. 4 for the noise."""
    sqrt_recip_ab = _extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape)
    sqrt_recipm1_ab = _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)
    return (sqrt_recip_ab * x_t - pred_xstart) / sqrt_recipm1_ab

  def p_mean_variance(
    self, model_output: Array, x_t: Array, t: Array, clip_denoised: bool = True
  ) -> dict[str, Array]:
    """Mean, variance and log-variance of p_θ(x_{t-1} | x_t) (Eq. 1), and the predicted x_0."""
    variance = _extract(self.model_variance, t, x_t.shape) * jnp.ones_like(x_t)
    log_variance = _extract(self.model_log_variance, t, x_t.shape) * jnp.ones_like(x_t)
    maybe_clip = (lambda x: jnp.clip(x, -1.0, 1.0)) if clip_denoised else (lambda x: x)
    if self.model_mean_type == 'xprev':
      pred_xstart = maybe_clip(self.predict_start_from_prev(x_t, t, model_output))
      mean = model_output
    else:
      if self.model_mean_type == 'eps':
        pred_xstart = self.predict_start_from_noise(x_t, t, model_output)
      elif self.model_mean_type == 'v':
        pred_xstart = self.predict_start_from_v(x_t, t, model_output)
      else:
        pred_xstart = model_output
      pred_xstart = maybe_clip(pred_xstart)
      mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
    return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)

  # --------------------------------------------------------------------------- losses
  def vb_terms_bpd(
    self, model_output: Array, x_start: Array, x_t: Array, t: Array, clip_denoised: bool = True
  ) -> tuple[Array, Array]:
    """Per-example L_{t-1} (Eq. 5) for t > 0 or decoder NLL L_0 (Eq. 13) at t = 0, in bits/dim.

    Returns the terms and the predicted x_0.
    """
    true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
    mean, log_variance = out['mean'], out['log_variance']
    kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance))
    log_p = discretized_gaussian_log_likelihood(x_start, means=mean, log_scales=0.5 * log_variance)
    decoder_nll = -mean_flat(log_p)
    return jnp.where(t == 0, decoder_nll, kl) / math.log(2.0), out['pred_xstart']

  def prior_bpd(self, x_start: Array) -> Array:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per example, in bits/dim."""
    t = jnp.full((x_start.shape[0],), self.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = self.q_mean_variance(x_start, t)
    return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

  def training_losses(self, model_fn: ModelFn, x_start: Array, t: Array, noise: Array) -> Array:
    """Per-example loss: L_simple (Eq. 14, mean over dims) or the bound's term in bits/dim."""
    x_t = self.q_sample(x_start, t, noise)
    model_output = model_fn(x_t, t)
    if self.loss_type == 'kl':
      return self.vb_terms_bpd(model_output, x_start, x_t, t, clip_denoised=False)[0]
    if self.model_mean_type == 'eps':
      target = noise
    elif self.model_mean_type == 'xstart':
      target = x_start
    elif self.model_mean_type == 'xprev':
      target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
    else:  # v = √ᾱ_t ε − √(1−ᾱ_t) x_0
      sqrt_ab = _extract(self.sqrt_alphas_cumprod, t, x_t.shape)
      sqrt_one_minus_ab = _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
      target = sqrt_ab * noise - sqrt_one_minus_ab * x_start
    return mean_flat(jnp.square(target - model_output))

  def calc_bpd_loop(
    self, model_fn: ModelFn, x_start: Array, rng: Array, clip_denoised: bool = True
  ) -> dict[str, Array]:
    """The full bound of Eq. 5 in bits/dim over all T terms, one compiled scan.

    Returns per-example ``total_bpd`` [B], ``prior_bpd`` [B] (L_T), ``terms_bpd`` [B, T]
    (column t is L_t for t > 0 and L_0 at t = 0), and ``xstart_mse`` and ``mse`` (of ε) [B, T].
    """

    def term(_, t_scalar):
      t = jnp.full((x_start.shape[0],), t_scalar, dtype=jnp.int32)
      noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x_start.shape, x_start.dtype)
      x_t = self.q_sample(x_start, t, noise)
      bpd, pred_xstart = self.vb_terms_bpd(model_fn(x_t, t), x_start, x_t, t, clip_denoised)
      pred_eps = self.predict_noise_from_start(x_t, t, pred_xstart)
      xstart_mse = mean_flat(jnp.square(pred_xstart - x_start))
      return None, (bpd, xstart_mse, mean_flat(jnp.square(pred_eps - noise)))

    timesteps = jnp.arange(self.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    _, (terms, xstart_mse, mse) = jax.lax.scan(term, None, timesteps)
    # Scanned from t = T-1 down to 0; store column t at index t.
    terms, xstart_mse, mse = (jnp.flip(a, axis=0).T for a in (terms, xstart_mse, mse))
    prior = self.prior_bpd(x_start)
    total = jnp.sum(terms, axis=1) + prior
    return dict(total_bpd=total, prior_bpd=prior, terms_bpd=terms, xstart_mse=xstart_mse, mse=mse)

  # --------------------------------------------------------------------------- sampling
  def p_sample(
    self, model_fn: ModelFn, x_t: Array, t: Array, rng: Array, clip_denoised: bool = True
  ) -> tuple[Array, Array]:
    """One step of Algorithm 2: x_{t-1} ~ p_θ(x_{t-1} | x_t), with no noise at t = 0."""
    out = self.p_mean_variance(model_fn(x_t, t), x_t, t, clip_denoised=clip_denoised)
    noise = jax.random.normal(rng, x_t.shape, x_t.dtype)
    nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
    sample = out['mean'] + nonzero * jnp.exp(0.5 * out['log_variance']) * noise
    return sample, out['pred_xstart']

  def p_sample_loop(
    self,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    rng: Array,
    *,
    clip_denoised: bool = True,
    progress_every: int | None = None,
  ) -> Array | tuple[Array, dict[str, Array]]:
    """Algorithm 2: x_T ~ N(0, I), then T reverse steps in one ``lax.scan``; returns x_0.

    Traceable: wrap in ``jax.jit`` to get one compiled program. Step t draws its noise
    from ``fold_in(rng, t)``, so a key fixes the samples. With ``progress_every = k``
    (dividing T), also returns ``{'t', 'x_t', 'pred_xstart'}`` stacked after every k-th
    step (the paper's progressive generation, Fig. 6): the step's code index, the
    sample it produced, and its prediction of x_0.
    """
    num_steps = self.num_timesteps
    k = progress_every or num_steps
    if num_steps % k:
      msg = f'progress_every={progress_every} must divide the number of timesteps {num_steps}.'
      raise ValueError(msg)
    x_init = jax.random.normal(jax.random.fold_in(rng, num_steps), shape, jnp.float32)

    def step(x, t_scalar):
      t = jnp.full((shape[0],), t_scalar, dtype=jnp.int32)
      return self.p_sample(model_fn, x, t, jax.random.fold_in(rng, t_scalar), clip_denoised)

    def chunk(x, chunk_start):
      x, pred_xstart = jax.lax.scan(step, x, chunk_start - jnp.arange(k))
      return x, (chunk_start - k + 1, x, pred_xstart[-1])

    starts = jnp.arange(num_steps - 1, -1, -k, dtype=jnp.int32)
    x, (ts, xs, pred_xstarts) = jax.lax.scan(chunk, x_init, starts)
    return x if progress_every is None else (x, dict(t=ts, x_t=xs, pred_xstart=pred_xstarts))
