"""The DDPM diffusion process (Ho, Jain & Abbeel 2020) as pure functions over arrays.

Names follow the original release (diffusion_tf/diffusion_utils_2.py). Timesteps are 0-based:
code step ``t = 0`` is the paper's ``t = 1`` and ``t = T - 1`` is the paper's ``t = T``. Schedule
arithmetic is float64 numpy, cast once to float32. Samplers: Algorithm 2, iDDPM respacing, DDIM.
``GaussianDiffusion`` is a pytree (its schedule arrays are leaves, its types static), so it can be
closed over or passed into ``jax.jit``. Nothing here holds a network: every method takes a
``model_fn(x_t, t)`` or its output.
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


def get_beta_schedule(
  kind: str, *, beta_start: float, beta_end: float, num_diffusion_timesteps: int
) -> np.ndarray:
  """The β_t of Eq. 2 in float64 (paper: ``linear`` 1e-4..0.02, T=1000; ``cosine`` ignores both)."""
  n = num_diffusion_timesteps
  if n < 1:
    raise ValueError(f'num_diffusion_timesteps must be >= 1, got {n}.')
  if kind not in BETA_SCHEDULES:
    raise ValueError(f'Unknown beta schedule {kind!r}; choose one of {BETA_SCHEDULES}.')

  def warmup(frac: float) -> np.ndarray:  # linear over the first ``frac`` of the steps, then β_end
    w = int(n * frac)
    return np.append(np.linspace(beta_start, beta_end, w), np.full(n - w, beta_end))

  def cosine(s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:  # Nichol & Dhariwal Eq. 17
    alphas_cumprod = np.cos((np.arange(n + 1, dtype=np.float64) / n + s) / (1 + s) * np.pi / 2) ** 2
    return np.minimum(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], max_beta)

  make_betas = {
    'linear': lambda: np.linspace(beta_start, beta_end, n, dtype=np.float64),
    'quad': lambda: np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2,
    'const': lambda: beta_end * np.ones(n, dtype=np.float64),
    'jsd': lambda: 1.0 / np.linspace(n, 1, n, dtype=np.float64),  # 1/T, 1/(T-1), ..., 1
    'warmup10': lambda: warmup(0.1),
    'warmup50': lambda: warmup(0.5),
    'cosine': cosine,
  }
  betas = make_betas[kind]()
  if not np.all((betas > 0) & (betas <= 1)):
    hint = f'check beta_start and beta_end (got {beta_start}, {beta_end})'
    raise ValueError(f'Betas of schedule {kind!r} must lie in (0, 1]; {hint}.')
  return betas


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
  side of the mean where both CDFs are small, so it keeps its precision far in the tails."""
  centered, inv_stdv = x - means, jnp.exp(-log_scales)
  plus_in, min_in = inv_stdv * (centered + 1.0 / 255.0), inv_stdv * (centered - 1.0 / 255.0)
  ndtr, log_ndtr = jax.scipy.special.ndtr, jax.scipy.special.log_ndtr
  cdf_delta = jnp.where(centered > 0, ndtr(-min_in) - ndtr(-plus_in), ndtr(plus_in) - ndtr(min_in))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_delta, 1e-12))
  log_not_first = jnp.where(x > 0.999, log_ndtr(-min_in), log_cdf_delta)  # 1 − CDF(min) in log
  return jnp.where(x < -0.999, log_ndtr(plus_in), log_not_first)


def _extract(a: Array, t: Array, x_shape: tuple[int, ...]) -> Array:
  """``a[t]`` for a batch of timesteps, shaped to broadcast against ``x_shape``."""
  return jnp.take(a, t, axis=0).reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))


@jax.tree_util.register_pytree_node_class
class GaussianDiffusion:
  """The forward process q, the reverse process p_θ, their losses, bound and sampler.

  Args:
    betas: β_t for t = 1..T (float64 from ``get_beta_schedule``).
    model_mean_type: what the network predicts: 'eps' (ε, Eq. 11), 'xstart' (x_0),
      'xprev' (μ of x_{t-1}), or 'v' (√ᾱ ε − √(1−ᾱ) x_0, Salimans & Ho 2022).
    model_var_type: Σ_θ = σ_t² I with 'fixedsmall' (β̃_t) or 'fixedlarge' (β_t; as in
      the original, its log-variance at the first step is that of β̃ at the second).
    loss_type: 'mse' (L_simple, Eq. 14, against the mean type's target) or 'kl' (Eq. 5, bits/dim).
    timestep_map: the timestep the model sees at each step (``respaced``); default arange(T).
  """

  def __init__(
    self,
    betas: np.ndarray,
    model_mean_type: MeanType = 'eps',
    model_var_type: VarType = 'fixedlarge',
    loss_type: LossType = 'mse',
    timestep_map: np.ndarray | None = None,
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
    self._betas64, self._fields = betas, (*schedule, 'timestep_map')  # _betas64 is no leaf
    self.__dict__.update({name: jnp.asarray(v, dtype=jnp.float32) for name, v in schedule.items()})
    steps = np.arange(betas.shape[0]) if timestep_map is None else timestep_map
    self.timestep_map = jnp.asarray(steps, dtype=jnp.int32)

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
    large = betas, np.log(np.append(second_step_var, betas[1:]))
    small = posterior_variance, posterior_log_variance_clipped
    model_variance, model_log_variance = large if model_var_type == 'fixedlarge' else small
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

  # Pytree protocol: schedule arrays and timestep_map are leaves, the three types are static.
  def tree_flatten(self):
    leaves = tuple(getattr(self, name) for name in self._fields)
    return leaves, (self.model_mean_type, self.model_var_type, self.loss_type, self._fields)

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    obj = object.__new__(cls)
    obj.model_mean_type, obj.model_var_type, obj.loss_type, obj._fields = aux
    obj.__dict__.update(zip(obj._fields, leaves))
    return obj

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  def respaced(self, num_steps: int) -> GaussianDiffusion:
    """iDDPM respacing: steps t_i = round(i (T−1)/(k−1)), β'_i = 1 − ᾱ_{t_i} / ᾱ_{t_{i−1}}."""
    n = self.num_timesteps
    if not 2 <= num_steps <= n:
      raise ValueError(f'num_steps must be in 2..{n}, got {num_steps}.')
    stride = (n - 1) / (num_steps - 1)  # summed, ties to even: iDDPM's space_timesteps(T, [k])
    steps = np.round(np.cumsum(np.append(0.0, np.full(num_steps - 1, stride)))).astype(np.int64)
    betas = self._betas64 if hasattr(self, '_betas64') else np.asarray(self.betas, np.float64)
    ac = np.cumprod(1.0 - betas)[steps]
    new_betas = betas if num_steps == n else 1.0 - ac / np.append(1.0, ac[:-1])
    types = (self.model_mean_type, self.model_var_type, self.loss_type)
    return type(self)(new_betas, *types, timestep_map=self.timestep_map[steps])

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
    predict = {
      'eps': self.predict_start_from_noise,
      'v': self.predict_start_from_v,
      'xprev': self.predict_start_from_prev,
    }.get(self.model_mean_type)  # None for 'xstart': the output is x_0
    pred_xstart = model_output if predict is None else predict(x_t, t, model_output)
    pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0) if clip_denoised else pred_xstart
    posterior_mean = self.q_posterior_mean_variance(pred_xstart, x_t, t)[0]
    mean = model_output if self.model_mean_type == 'xprev' else posterior_mean
    return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)

  def vb_terms_bpd(
    self, model_output: Array, x_start: Array, x_t: Array, t: Array, clip_denoised: bool = True
  ) -> tuple[Array, Array]:
    """Per-example L_{t-1} (Eq. 5) for t > 0, decoder NLL L_0 (Eq. 13) at t = 0, bits/dim; x̂_0."""
    true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
    mean, log_variance = out['mean'], out['log_variance']
    kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance))
    log_p = discretized_gaussian_log_likelihood(x_start, means=mean, log_scales=0.5 * log_variance)
    return jnp.where(t == 0, -mean_flat(log_p), kl) / math.log(2.0), out['pred_xstart']

  def prior_bpd(self, x_start: Array) -> Array:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per example, in bits/dim."""
    t = jnp.full((x_start.shape[0],), self.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = self.q_mean_variance(x_start, t)
    return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

  def training_losses(self, model_fn: ModelFn, x_start: Array, t: Array, noise: Array) -> Array:
    """Per-example loss: L_simple (Eq. 14, mean over dims) or the bound's term in bits/dim."""
    x_t = self.q_sample(x_start, t, noise)
    model_output = model_fn(x_t, self.timestep_map[t])
    if self.loss_type == 'kl':
      return self.vb_terms_bpd(model_output, x_start, x_t, t, clip_denoised=False)[0]
    target = dict(eps=noise, xstart=x_start).get(self.model_mean_type)
    if self.model_mean_type == 'xprev':
      target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
    elif self.model_mean_type == 'v':
      target = self.q_sample(noise, t, -x_start)  # v = √ᾱ_t ε − √(1−ᾱ_t) x_0
    return mean_flat(jnp.square(target - model_output))

  def calc_bpd_loop(
    self, model_fn: ModelFn, x_start: Array, rng: Array, clip_denoised: bool = True
  ) -> dict[str, Array]:
    """The full bound of Eq. 5 in bits/dim over all T terms, one compiled scan.

    Returns per-example ``total_bpd`` [B], ``prior_bpd`` [B] (L_T), ``terms_bpd`` [B, T]
    (column t is L_t for t > 0 and L_0 at t = 0), and ``xstart_mse`` and ``mse`` (of ε) [B, T]."""

    def term(_, t_scalar):
      t = jnp.full((x_start.shape[0],), t_scalar, dtype=jnp.int32)
      noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x_start.shape, x_start.dtype)
      x_t = self.q_sample(x_start, t, noise)
      model_output = model_fn(x_t, self.timestep_map[t])
      bpd, pred_xstart = self.vb_terms_bpd(model_output, x_start, x_t, t, clip_denoised)
      pred_eps = self.predict_noise_from_start(x_t, t, pred_xstart)
      xstart_mse = mean_flat(jnp.square(pred_xstart - x_start))
      return None, (bpd, xstart_mse, mean_flat(jnp.square(pred_eps - noise)))

    _, outs = jax.lax.scan(term, None, jnp.arange(self.num_timesteps, dtype=jnp.int32))
    terms, xstart_mse, mse = (a.T for a in outs)  # column t at index t
    prior = self.prior_bpd(x_start)
    total = jnp.sum(terms, axis=1) + prior
    return dict(total_bpd=total, prior_bpd=prior, terms_bpd=terms, xstart_mse=xstart_mse, mse=mse)

  def p_sample(
    self, model_fn: ModelFn, x_t: Array, t: Array, rng: Array, clip_denoised: bool = True
  ) -> tuple[Array, Array]:
    """One step of Algorithm 2: x_{t-1} ~ p_θ(x_{t-1} | x_t), with no noise at t = 0."""
    out = self.p_mean_variance(model_fn(x_t, self.timestep_map[t]), x_t, t, clip_denoised)
    noise = jax.random.normal(rng, x_t.shape, x_t.dtype)
    nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return out['mean'] + nonzero * jnp.exp(0.5 * out['log_variance']) * noise, out['pred_xstart']

  def _sample(self, step: Callable, shape: tuple, rng: Array, x_T: Any, every: Any) -> Any:
    """From x_T, ``step(x, t, fold_in(rng, t))`` for t = T−1..0 in one scan of ``every``-chunks."""
    n = self.num_timesteps
    if n % (every or n):
      raise ValueError(f'progress_every={every} must divide the number of timesteps {n}.')
    x = jax.random.normal(jax.random.fold_in(rng, n), shape, jnp.float32) if x_T is None else x_T
    scan_step = lambda x, i: step(x, jnp.full(shape[:1], i, jnp.int32), jax.random.fold_in(rng, i))

    def chunk(x, steps):
      x, pred_xstart = jax.lax.scan(scan_step, x, steps)
      return x, dict(t=self.timestep_map[steps[-1]], x_t=x, pred_xstart=pred_xstart[-1])

    steps = jnp.arange(n - 1, -1, -1, dtype=jnp.int32).reshape(-1, every or n)
    x, progress = jax.lax.scan(chunk, x, steps)
    return x if every is None else (x, progress)

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

    Step t draws its noise from ``fold_in(rng, t)``, x_T from ``fold_in(rng, T)``. With
    ``progress_every = k`` (dividing T), also returns ``{'t', 'x_t', 'pred_xstart'}`` after every
    k-th step (Fig. 6): the step's timestep (as the model sees it), its sample and x̂_0."""
    step = lambda x, t, key: self.p_sample(model_fn, x, t, key, clip_denoised)
    return self._sample(step, shape, rng, None, progress_every)

  def ddim_sample_loop(
    self,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    rng: Array,
    *,
    num_steps: int | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    progress_every: int | None = None,
    x_T: Array | None = None,
  ) -> Array | tuple[Array, dict[str, Array]]:
    """DDIM (Song et al. 2021): Eq. 12 with σ_t(η) of Eq. 16 on ``respaced(num_steps)``."""
    d = self if num_steps in (None, self.num_timesteps) else self.respaced(num_steps)

    def step(x, t, key):
      out = d.p_mean_variance(model_fn(x, d.timestep_map[t]), x, t, clip_denoised)
      eps = d.predict_noise_from_start(x, t, out['pred_xstart'])
      ac_prev, var = d.alphas_cumprod_prev[t[0]], d.posterior_variance[t[0]]  # σ_t² = η² β̃_t
      x = jnp.sqrt(ac_prev) * out['pred_xstart'] + jnp.sqrt(1.0 - ac_prev - eta**2 * var) * eps
      return x + eta * jnp.sqrt(var) * jax.random.normal(key, x.shape, x.dtype), out['pred_xstart']

    return d._sample(step, shape, rng, x_T, progress_every)

  def ddim_reverse_loop(
    self,
    model_fn: ModelFn,
    x_0: Array,
    *,
    num_steps: int | None = None,
    clip_denoised: bool = False,
  ) -> Array:
    """The DDIM encoder x_0 -> x_T: Eq. 12 with η = 0 run forward in t (DDIM inversion)."""
    d = self if num_steps in (None, self.num_timesteps) else self.respaced(num_steps)

    def step(x, i):
      t = jnp.full((x.shape[0],), i, dtype=jnp.int32)
      out = d.p_mean_variance(model_fn(x, d.timestep_map[t]), x, t, clip_denoised)
      eps = d.predict_noise_from_start(x, t, out['pred_xstart'])
      ac_prev = d.alphas_cumprod_prev[i]  # x's ᾱ: x̂_0 from ε there, then x_t = q_sample(x̂_0, ε)
      return d.q_sample((x - jnp.sqrt(1.0 - ac_prev) * eps) / jnp.sqrt(ac_prev), t, eps), None

    return jax.lax.scan(step, x_0, jnp.arange(d.num_timesteps, dtype=jnp.int32))[0]
