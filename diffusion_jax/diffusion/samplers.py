"""The reverse chain's samplers: Algorithm 2 (from x_T or any x_t), DDIM, DDIM inversion, and
DPM-Solver++(2M).

``Samplers`` is mixed into ``GaussianDiffusion``, whose one-step methods (``p_sample``,
``p_mean_variance``, ``predict_noise_from_start``, ``q_sample``), schedule and ``respaced`` they
use. Every reverse sampler runs one compiled scan (``_reverse_chain``): step t draws its noise
from ``fold_in(rng, t)`` and x_T from ``fold_in(rng, T)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Self

import jax
import jax.numpy as jnp

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # model_fn(x_t, t) -> the network's output
# step(x_t, t, key) -> (x_{t-1}, x̂_0), for a batch of equal timesteps t.
Step = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
# x_0, or with ``progress_every`` x_0 and {'t', 'x_t', 'pred_xstart'} every k-th step.
Samples = jax.Array | tuple[jax.Array, dict[str, jax.Array]]


class Samplers:
  """The sampling methods of ``GaussianDiffusion`` (see the module's docstring)."""

  def p_sample_loop(
    self,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    rng: jax.Array,
    *,
    clip_denoised: bool = True,
    progress_every: int | None = None,
  ) -> Samples:
    """Algorithm 2: x_T ~ N(0, I), then T reverse steps in one ``lax.scan``; returns x_0.

    Step t draws its noise from ``fold_in(rng, t)``, x_T from ``fold_in(rng, T)``. With
    ``progress_every = k`` (dividing T), also returns ``{'t', 'x_t', 'pred_xstart'}`` after every
    k-th step (Fig. 6): the step's timestep (as the model sees it), its sample and x̂_0."""
    x_T = self._prior_sample(shape, rng)
    return self.p_sample_loop_from(
      model_fn,
      x_T,
      self.num_timesteps - 1,
      rng,
      clip_denoised=clip_denoised,
      progress_every=progress_every,
    )

  def p_sample_loop_from(
    self,
    model_fn: ModelFn,
    x_t: jax.Array,
    t: int,
    rng: jax.Array,
    *,
    clip_denoised: bool = True,
    progress_every: int | None = None,
  ) -> Samples:
    """Algorithm 2 from a given x_t: code steps t, t−1, ..., 0, step s's noise from fold_in(rng, s).

    ``progress_every`` as in ``p_sample_loop``; it must divide the t + 1 steps."""

    def step(x: jax.Array, s: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
      return self.p_sample(model_fn, x, s, key, clip_denoised)

    return self._reverse_chain(step, x_t, t, rng, progress_every)

  def ddim_sample_loop(
    self,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    rng: jax.Array,
    *,
    num_steps: int | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    progress_every: int | None = None,
    x_T: jax.Array | None = None,
  ) -> Samples:
    """DDIM (Song et al. 2021): Eq. 12 with σ_t(η) of Eq. 16 on ``respaced(num_steps)``."""
    d = self._with_steps(num_steps)

    def step(x: jax.Array, t: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
      out = d.p_mean_variance(model_fn(x, d.timestep_map[t]), x, t, clip_denoised)
      eps = d.predict_noise_from_start(x, t, out['pred_xstart'])
      ac_prev = d.alphas_cumprod_prev[t[0]]
      var = d.posterior_variance[t[0]]  # σ_t² = η² β̃_t
      x = jnp.sqrt(ac_prev) * out['pred_xstart'] + jnp.sqrt(1.0 - ac_prev - eta**2 * var) * eps
      return x + eta * jnp.sqrt(var) * jax.random.normal(key, x.shape, x.dtype), out['pred_xstart']

    x = d._prior_sample(shape, rng) if x_T is None else x_T
    return d._reverse_chain(step, x, d.num_timesteps - 1, rng, progress_every)

  def ddim_reverse_loop(
    self,
    model_fn: ModelFn,
    x_0: jax.Array,
    *,
    num_steps: int | None = None,
    clip_denoised: bool = False,
  ) -> jax.Array:
    """The DDIM encoder x_0 -> x_T: Eq. 12 with η = 0 run forward in t (DDIM inversion)."""
    d = self._with_steps(num_steps)

    def step(x: jax.Array, i: jax.Array) -> tuple[jax.Array, None]:
      t = jnp.full((x.shape[0],), i, dtype=jnp.int32)
      out = d.p_mean_variance(model_fn(x, d.timestep_map[t]), x, t, clip_denoised)
      eps = d.predict_noise_from_start(x, t, out['pred_xstart'])
      ac_prev = d.alphas_cumprod_prev[i]  # x's ᾱ: x̂_0 from ε there, then x_t = q_sample(x̂_0, ε)
      return d.q_sample((x - jnp.sqrt(1.0 - ac_prev) * eps) / jnp.sqrt(ac_prev), t, eps), None

    return jax.lax.scan(step, x_0, jnp.arange(d.num_timesteps, dtype=jnp.int32))[0]

  def dpm_solver_loop(
    self,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    rng: jax.Array,
    *,
    num_steps: int | None = None,
    clip_denoised: bool = True,
    lower_order_final: bool = True,
    x_T: jax.Array | None = None,
  ) -> jax.Array:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): the probability-flow ODE in data-prediction
    form, x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) D with h = λ_t − λ_s, λ = log(α/σ), and D the
    multistep second-order combination of the last two x̂_0; on ``respaced(num_steps)``'s
    timesteps, the last step going to σ = 0 (x̂_0 itself). With ``lower_order_final`` a short
    schedule (< 15 steps) takes its last two steps at first order. Deterministic: ``rng`` (or
    ``x_T``) gives x_T only."""
    d = self._with_steps(num_steps)
    n = d.num_timesteps
    alpha = jnp.sqrt(d.alphas_cumprod)
    sigma = jnp.sqrt(1.0 - d.alphas_cumprod)
    lam = jnp.log(alpha) - jnp.log(sigma)
    first_order_from = 1 if lower_order_final else 0  # steps from t <= this: first order

    def step(carry, i):
      x, previous, h_previous = carry  # previous: x̂_0 at the step before (i + 1)
      t = jnp.full(x.shape[:1], i, jnp.int32)
      pred = d.p_mean_variance(model_fn(x, d.timestep_map[t]), x, t, clip_denoised)['pred_xstart']
      to = jnp.maximum(i - 1, 0)
      h = lam[to] - lam[i]
      r = h_previous / h
      second = (i < n - 1) & (i > first_order_from)
      data = jnp.where(second, (1 + 1 / (2 * r)) * pred - (1 / (2 * r)) * previous, pred)
      x_next = sigma[to] / sigma[i] * x - alpha[to] * jnp.expm1(-h) * data
      x_next = jnp.where(i == 0, pred, x_next)  # the last step: to σ = 0, x̂_0
      return (x_next, pred, h), None

    x = d._prior_sample(shape, rng) if x_T is None else x_T
    carry = (x, jnp.zeros_like(x), jnp.ones((), jnp.float32))
    return jax.lax.scan(step, carry, jnp.arange(n - 1, -1, -1, dtype=jnp.int32))[0][0]

  def _with_steps(self, num_steps: int | None) -> Self:
    """This process, or ``respaced(num_steps)`` if that is fewer steps."""
    return self if num_steps in (None, self.num_timesteps) else self.respaced(num_steps)

  def _prior_sample(self, shape: tuple[int, ...], rng: jax.Array) -> jax.Array:
    """x_T ~ p(x_T) = N(0, I) (Eq. 1), drawn from ``fold_in(rng, T)``."""
    return jax.random.normal(jax.random.fold_in(rng, self.num_timesteps), shape, jnp.float32)

  def _reverse_chain(
    self, step: Step, x_t: jax.Array, t: int, rng: jax.Array, progress_every: int | None
  ) -> Samples:
    """From x_t, ``x = step(x, s, fold_in(rng, s))`` for s = t..0: one scan of scans of
    ``progress_every`` steps, each chunk reporting its last timestep, sample and x̂_0."""
    num_steps = t + 1
    chunk_size = progress_every or num_steps
    if num_steps % chunk_size:
      raise ValueError(
        f'progress_every={progress_every} must divide the number of steps {num_steps}.'
      )

    def scan_step(x: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
      return step(x, jnp.full(x.shape[:1], s, jnp.int32), jax.random.fold_in(rng, s))

    def chunk(x: jax.Array, steps: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
      x, pred_xstart = jax.lax.scan(scan_step, x, steps)
      return x, dict(t=self.timestep_map[steps[-1]], x_t=x, pred_xstart=pred_xstart[-1])

    steps = jnp.arange(t, -1, -1, dtype=jnp.int32).reshape(-1, chunk_size)
    x, progress = jax.lax.scan(chunk, x_t, steps)
    return x if progress_every is None else (x, progress)
