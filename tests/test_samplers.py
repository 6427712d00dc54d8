"""Samplers that skip steps (iDDPM respacing, DDIM) against float64 closed forms on Gaussian data.

With the analytic-optimal ε of x_0 ~ N(MU, S²) every sampler is an affine map plus Gaussian noise
per step, so its output's mean and variance have a closed form (``sampler_moments``): the samples
are compared with that, not with (MU, S²), since few-step samplers are biased even with the exact
ε (PAPER.md, "Testing samplers that skip steps").
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion

from gaussian_reference import (
  MU,
  S,
  ddim_encoder_map,
  expected_bound_bits,
  optimal_eps_fn,
  sampler_moments,
)

pytestmark = pytest.mark.stack  # the subset CI runs on every supported Python

T = 1000
BETAS = np.linspace(1e-4, 0.02, T, dtype=np.float64)
AC = np.cumprod(1 - BETAS)
EPS_FN = optimal_eps_fn(AC)  # called with the original timesteps, so it fits every respacing


def make(var_type='fixedsmall', mean_type='eps'):
  return diffusion.GaussianDiffusion(BETAS, mean_type, var_type, 'mse')


def iddpm_space_timesteps(num_timesteps: int, count: int) -> list[int]:
  """improved-diffusion's space_timesteps(num_timesteps, [count]) for one section, verbatim."""
  frac_stride = (num_timesteps - 1) / (count - 1)
  cur_idx, taken_steps = 0.0, []
  for _ in range(count):
    taken_steps.append(round(cur_idx))
    cur_idx += frac_stride
  return taken_steps


def moments(x) -> tuple[float, float]:
  x = np.asarray(x, np.float64).ravel()
  return x.mean(), x.var()


# ----------------------------------------------------------------------------- respacing


@pytest.mark.parametrize('k', [2, 10, 21, 25, 50, 100, 250, 999])
def test_respacing_is_iddpms_rule_and_keeps_alphas_cumprod(k):
  d = make().respaced(k)
  steps = iddpm_space_timesteps(T, k)
  assert steps[0] == 0 and steps[-1] == T - 1 and len(set(steps)) == k
  np.testing.assert_array_equal(d.timestep_map, steps)
  assert d.num_timesteps == k and d.timestep_map.dtype == jnp.int32
  np.testing.assert_allclose(d.alphas_cumprod, AC[steps], rtol=2e-6)
  ac_prev = np.append(1.0, AC[steps][:-1])
  np.testing.assert_allclose(d.betas, 1 - AC[steps] / ac_prev, rtol=2e-6)
  # Respacing a respaced process composes the maps.
  np.testing.assert_array_equal(d.respaced(2).timestep_map, [0, T - 1])


def test_respacing_bad_counts_are_clear_errors():
  for k in (0, 1, T + 1):
    with pytest.raises(ValueError, match='num_steps must be in 2..1000'):
      make().respaced(k)


def test_respaced_with_all_steps_is_the_original_bit_for_bit():
  d = make('fixedlarge')
  r = d.respaced(T)
  leaves, treedef = jax.tree_util.tree_flatten(d)
  r_leaves, r_treedef = jax.tree_util.tree_flatten(r)
  assert treedef == r_treedef
  for a, b in zip(leaves, r_leaves):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(r.timestep_map, np.arange(T))
  rng = jax.random.PRNGKey(0)

  def sample(p):
    return jax.jit(lambda k: p.p_sample_loop(EPS_FN, (64, 4), k))(rng)

  np.testing.assert_array_equal(sample(r), sample(d))


@pytest.mark.parametrize('k', [10, 50])
def test_respacing_does_not_depend_on_the_objects_history(k):
  """``respaced`` starts from the exact float64 β_t, a static field of the pytree: the process
  rebuilt by ``tree_unflatten`` and the one inside ``jax.jit`` respace to the same bits."""
  d = make('fixedlarge')
  leaves, treedef = jax.tree_util.tree_flatten(d)
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  expected, expected_treedef = jax.tree_util.tree_flatten(d.respaced(k))
  for respaced in (rebuilt.respaced(k), jax.jit(lambda p: p.respaced(k))(d)):
    got, got_treedef = jax.tree_util.tree_flatten(respaced)
    assert got_treedef == expected_treedef
    for a, b in zip(got, expected):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a, b)


def test_the_model_sees_the_original_timesteps():
  """Every place the model is called maps the step through ``timestep_map``."""
  d = make().respaced(10)
  expected = set(np.asarray(d.timestep_map).tolist())
  seen = []

  def model_fn(x, t):
    jax.debug.callback(lambda t: seen.extend(np.asarray(t).tolist()), t)
    return EPS_FN(x, t)

  x0, rng = jnp.full((2, 3), 0.2), jax.random.PRNGKey(0)
  runs = {
    'p_sample_loop': lambda: d.p_sample_loop(model_fn, (2, 3), rng),
    'ddim_sample_loop': lambda: d.ddim_sample_loop(model_fn, (2, 3), rng),
    'ddim_reverse_loop': lambda: d.ddim_reverse_loop(model_fn, x0),
    'calc_bpd_loop': lambda: d.calc_bpd_loop(model_fn, x0, rng),
    'training_losses': lambda: d.training_losses(model_fn, x0[:1].repeat(10, 0), jnp.arange(10), 0),
  }
  for name, run in runs.items():
    seen.clear()
    jax.block_until_ready(run())
    jax.effects_barrier()
    assert set(seen) == expected, name


# ----------------------------------------------------------------------------- DDIM


def test_ddim_is_one_compiled_scan_each_way():
  calls = []

  def model_fn(x, t):
    calls.append(1)
    return EPS_FN(x, t)

  d = make()
  jax.jit(lambda k: d.ddim_sample_loop(model_fn, (2, 3), k, num_steps=50))(jax.random.PRNGKey(0))
  jax.jit(lambda x: d.ddim_reverse_loop(model_fn, x, num_steps=50))(jnp.zeros((2, 3)))
  assert len(calls) == 2


def test_ddim_with_all_steps_and_eta_1_is_the_fixedsmall_ancestral_sampler():
  """Same key, same x_T and noise: the paths agree to float32 rounding, and both draw the
  closed-form moments of Algorithm 2 with σ² = β̃ (which the DDIM recursion equals exactly)."""
  d, rng, shape = make('fixedsmall'), jax.random.PRNGKey(1), (1 << 14, 16)
  ancestral = jax.jit(lambda k: d.p_sample_loop(EPS_FN, shape, k, clip_denoised=False))(rng)
  ddim = jax.jit(lambda k: d.ddim_sample_loop(EPS_FN, shape, k, eta=1.0, clip_denoised=False))(rng)
  max_diff = float(jnp.max(jnp.abs(ddim - ancestral)))
  assert max_diff < 1e-4, max_diff  # float32 rounding only: measured 1.8e-6
  m, v = sampler_moments(AC, range(T), sampler='ancestral', var='fixedsmall')
  m_ddim, v_ddim = sampler_moments(AC, range(T), sampler='ddim', eta=1.0)
  assert abs(m - m_ddim) < 1e-12 and abs(v / v_ddim - 1) < 1e-10
  n = ddim.size
  for x in (ancestral, ddim):
    mean, var = moments(x)
    assert abs(mean - m) < 5 * math.sqrt(v / n), (mean, m)
    assert abs(var / v - 1) < 5 * math.sqrt(2 / n), (var, v)


@pytest.mark.parametrize(
  'sampler,num_steps,kw',
  [
    ('ancestral', 100, dict(var='fixedsmall')),
    ('ancestral', 100, dict(var='fixedlarge')),
    ('ddim', 50, dict(eta=0.0)),
    ('ddim', 50, dict(eta=1.0)),
  ],
)
def test_few_step_samplers_draw_their_recursions_moments(sampler, num_steps, kw):
  """2^18 values: 5 standard errors are 0.3% of S on the mean and 1.4% on the variance, several
  times smaller than the samplers' own bias of the variance from S² (+7.5% to −29%), which the
  closed form predicts (measured: mean within 1.5 SE, variance within 0.6%)."""
  shape, rng = (1 << 14, 16), jax.random.PRNGKey(2)
  if sampler == 'ancestral':
    d = make(kw['var']).respaced(num_steps)
    x = jax.jit(lambda k: d.p_sample_loop(EPS_FN, shape, k, clip_denoised=False))(rng)
  else:
    d = make()
    x = jax.jit(
      lambda k: d.ddim_sample_loop(
        EPS_FN, shape, k, num_steps=num_steps, eta=kw['eta'], clip_denoised=False
      )
    )(rng)
  m, v = sampler_moments(AC, iddpm_space_timesteps(T, num_steps), sampler=sampler, **kw)
  n = x.size
  tol_mean, tol_var = 5 * math.sqrt(v / n), 5 * math.sqrt(2 / n)
  assert abs(v / S**2 - 1) > 3 * tol_var  # the bias the test must not mistake for an error
  mean, var = moments(x)
  assert abs(mean - m) < tol_mean, (mean, m, tol_mean)
  assert abs(var / v - 1) < tol_var, (var / v - 1, tol_var)


def test_ddim_eta_0_is_deterministic_given_x_T():
  d, shape = make(), (256, 4)
  run = jax.jit(lambda k, x_T: d.ddim_sample_loop(EPS_FN, shape, k, num_steps=50, x_T=x_T))
  k0, k1 = jax.random.PRNGKey(3), jax.random.PRNGKey(4)
  x_T = jax.random.normal(jax.random.fold_in(k0, 50), shape)  # the x_T that k0 draws
  sample = jax.jit(lambda k: d.ddim_sample_loop(EPS_FN, shape, k, num_steps=50))
  a = sample(k0)
  np.testing.assert_array_equal(a, sample(k0))
  np.testing.assert_array_equal(a, run(k0, x_T))
  # Other per-step noise keys, same x_T: identical; another key draws another x_T.
  np.testing.assert_array_equal(a, run(k1, x_T))
  assert not np.allclose(a, sample(k1))
  # With η = 1 the per-step noise does matter.
  noisy = jax.jit(lambda k: d.ddim_sample_loop(EPS_FN, shape, k, num_steps=50, eta=1.0, x_T=x_T))
  assert not np.allclose(noisy(k0), noisy(k1))


def test_ddim_progress_reports_original_timesteps():
  d = make()
  rng = jax.random.PRNGKey(5)
  x0, progress = d.ddim_sample_loop(EPS_FN, (2, 3), rng, num_steps=50, progress_every=10)
  steps = iddpm_space_timesteps(T, 50)
  np.testing.assert_array_equal(progress['t'], [steps[i] for i in (40, 30, 20, 10, 0)])
  np.testing.assert_array_equal(progress['x_t'][-1], x0)
  np.testing.assert_array_equal(x0, d.ddim_sample_loop(EPS_FN, (2, 3), rng, num_steps=50))
  with pytest.raises(ValueError, match='must divide'):
    d.ddim_sample_loop(EPS_FN, (2, 3), rng, num_steps=50, progress_every=15)


@pytest.mark.parametrize('num_steps,tol', [(T, 1e-2), (50, 0.2)])
def test_ddim_reverse_then_sample_reconstructs_x0(num_steps, tol):
  """Encode x_0 -> x_T (``ddim_reverse_loop``) and decode it (``ddim_sample_loop`` from that x_T).

  Each way is the float64 affine map of its recursion up to float32 rounding (< 1e-4; measured
  8e-6). DDIM inversion is first order, so the round trip itself is off by the recursions' own
  error: max 6.2e-3 with 1000 steps and 0.12 with 50 over 4096 values of N(0.2, 0.3²), which
  the code reproduces within 1e-4 (measured 2e-7), under the tolerance 1e-2 (1000) or 0.2 (50).
  """
  d, steps = make(), iddpm_space_timesteps(T, num_steps)
  x0 = MU + S * jax.random.normal(jax.random.PRNGKey(6), (1024, 4))
  x_T = jax.jit(lambda x: d.ddim_reverse_loop(EPS_FN, x, num_steps=num_steps))(x0)

  def decode(x):
    return d.ddim_sample_loop(
      EPS_FN, x.shape, jax.random.PRNGKey(0), num_steps=num_steps, x_T=x, clip_denoised=False
    )

  x0_back = jax.jit(decode)(x_T)
  x0_64, x_T_64 = np.asarray(x0, np.float64), np.asarray(x_T, np.float64)
  slope, offset = ddim_encoder_map(AC, steps)

  def ddim_64(x):
    return sampler_moments(AC, steps, sampler='ddim', start=(x, 0.0))[0]

  np.testing.assert_allclose(x_T, slope * x0_64 + offset, atol=1e-4)
  np.testing.assert_allclose(x0_back, ddim_64(x_T_64), atol=1e-4)
  err, predicted = np.abs(x0_back - x0_64), np.abs(ddim_64(slope * x0_64 + offset) - x0_64)
  assert abs(err.max() - predicted.max()) < 1e-4, (err.max(), predicted.max())
  assert err.max() < tol, err.max()
  mean, var = moments(x_T)
  assert abs(mean) < 0.05 and abs(var - 1) < 0.1  # x_T ≈ N(0, I)


@pytest.mark.parametrize('mean_type', ['xstart', 'v', 'xprev'])
def test_ddim_works_for_every_mean_type(mean_type):
  """The optimal model written in each parameterization samples as the ε one does (x_prev
  is tied to one-step posteriors, so it is tested with all steps only)."""
  num_steps = T if mean_type == 'xprev' else 50
  d, d_eps = make(mean_type=mean_type), make()
  ac = jnp.asarray(AC, jnp.float32)

  def model_fn(x, t):
    eps = EPS_FN(x, t)
    a = ac[t].reshape(-1, 1)
    x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
    if mean_type == 'xstart':
      return x0
    if mean_type == 'v':
      return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0
    return d.q_posterior_mean_variance(x0, x, t)[0]

  rng, shape = jax.random.PRNGKey(7), (512, 4)

  def run(p, f):
    return jax.jit(
      lambda k: p.ddim_sample_loop(f, shape, k, num_steps=num_steps, clip_denoised=False)
    )(rng)

  err = float(jnp.max(jnp.abs(run(d, model_fn) - run(d_eps, EPS_FN))))
  assert err < 1e-4, err  # float32 rounding of the conversions: measured <= 4.8e-6


# ----------------------------------------------------------------------------- the bound


def test_bound_of_a_respaced_process_sums_its_terms_and_matches_its_closed_form():
  """The bound of the 50-step process is ~47 bits/dim (its first KL, ~42, dominates: few steps
  make a loose bound); its closed form takes the respaced β' (measured within 1 SE of 0.3)."""
  k = 50
  d = make().respaced(k)
  rng = np.random.default_rng(8)
  n, dim = 2048, 16
  x0 = np.clip(np.round((rng.normal(MU, S, (n, dim)) + 1) * 127.5), 0, 255) / 127.5 - 1
  out = jax.jit(lambda x, r: d.calc_bpd_loop(EPS_FN, x, r, clip_denoised=False))(
    jnp.asarray(x0, jnp.float32), jax.random.PRNGKey(9)
  )
  assert out['terms_bpd'].shape == (n, k) and np.all(np.isfinite(out['terms_bpd']))
  np.testing.assert_allclose(
    out['total_bpd'], out['terms_bpd'].sum(1) + out['prior_bpd'], rtol=1e-5
  )
  steps = iddpm_space_timesteps(T, k)
  betas = 1 - AC[steps] / np.append(1.0, AC[steps][:-1])
  bpd = np.asarray(out['total_bpd'], np.float64)
  mean, se = bpd.mean(), bpd.std() / math.sqrt(n)
  expected = expected_bound_bits(betas, MU, S)
  assert abs(mean - expected) < 4 * se + 0.01, (mean, expected, se)


# ----------------------------------------------------------------------------- DPM-Solver++


def flow_to_data(x_t: np.ndarray, t: int) -> np.ndarray:
  """The probability-flow ODE's exact map from x_t to x_0 for N(MU, S²) data: x_t's marginal is
  N(α MU, α² S² + σ²), and the flow keeps each point's quantile."""
  alpha, sigma = math.sqrt(AC[t]), math.sqrt(1 - AC[t])
  return MU + S * (x_t - alpha * MU) / math.sqrt(alpha**2 * S**2 + sigma**2)


def ode_errors(sample, x_T: jax.Array, step_counts) -> dict[int, float]:
  """The largest distance of ``sample(num_steps)``'s x_0 to the sampler on all T steps."""
  reference = np.asarray(sample(T), np.float64)
  return {
    n: float(np.abs(np.asarray(sample(n), np.float64) - reference).max()) for n in step_counts
  }


def test_dpm_solver_converges_to_the_flow_at_second_order_where_ddim_is_first():
  d = make()
  x_T = jax.random.normal(jax.random.PRNGKey(0), (2048, 1))
  key = jax.random.PRNGKey(1)  # unused by either: both are deterministic given x_T

  def dpm(n):
    return jax.jit(
      lambda x: d.dpm_solver_loop(EPS_FN, x.shape, key, num_steps=n, clip_denoised=False, x_T=x)
    )(x_T)

  def ddim(n):
    return jax.jit(
      lambda x: d.ddim_sample_loop(EPS_FN, x.shape, key, num_steps=n, clip_denoised=False, x_T=x)
    )(x_T)

  # On all T steps the solver is the flow, up to the last step's jump from σ_0 = 0.01 to 0.
  exact = flow_to_data(np.asarray(x_T, np.float64), T - 1)
  assert np.abs(np.asarray(dpm(T), np.float64) - exact).max() < 1e-3
  counts = (32, 64, 128)
  dpm_errors, ddim_errors = ode_errors(dpm, x_T, counts), ode_errors(ddim, x_T, counts)

  def order(errors):  # error ~ n^-order, fitted over the doublings
    return math.log(errors[counts[0]] / errors[counts[-1]]) / math.log(counts[-1] / counts[0])

  assert 1.7 < order(dpm_errors) < 3.5, dpm_errors  # second order
  assert 0.8 < order(ddim_errors) < 1.2, ddim_errors  # DDIM (η = 0): first order
  assert dpm_errors[64] < ddim_errors[128] / 5  # half the steps, a fifth of the error


@pytest.mark.parametrize('num_steps', [64, 200])
def test_dpm_solver_is_deterministic_and_reaches_the_data_distribution(num_steps):
  d = make()
  sample = jax.jit(lambda k: d.dpm_solver_loop(EPS_FN, (20_000, 1), k, num_steps=num_steps))
  x = sample(jax.random.PRNGKey(3))
  np.testing.assert_array_equal(x, sample(jax.random.PRNGKey(3)))
  mean, var = moments(x)
  assert abs(mean - MU) < 0.01 and abs(var - S**2) < 0.005, (mean, var)


# ----------------------------------------------------------------------------- guidance

MIX_MU, MIX_S = np.array([-0.5, 0.5]), 0.2  # two equally likely classes c: x_0 | c ~ N(μ_c, s²)


def class_eps(x, a, mu, xp=np):
  """The optimal ε of N(mu, MIX_S²) data at ᾱ = a: linear in x_t."""
  return xp.sqrt(1 - a) * (x - xp.sqrt(a) * mu) / (a * MIX_S**2 + 1 - a)


def mixture_eps(x, a, xp=np):
  """The optimal ε of the class mixture: the classes' ε weighted by their posterior at x_t."""
  var = a * MIX_S**2 + 1 - a
  logits = xp.stack([-((x - xp.sqrt(a) * mu) ** 2) / (2 * var) for mu in MIX_MU])
  weights = xp.exp(logits - logits.max(axis=0))
  weights = weights / weights.sum(axis=0)
  return sum(w * class_eps(x, a, mu, xp) for w, mu in zip(weights, MIX_MU))


def guided_eps(x, a, label: int, w: float, xp=np):
  """ε̃ = (1 + w) ε(x, c) − w ε(x, ∅) (Ho & Salimans 2021) of the closed-form models."""
  return (1 + w) * class_eps(x, a, MIX_MU[label], xp) - w * mixture_eps(x, a, xp)


def guided_flow(x_T: np.ndarray, label: int, w: float) -> np.ndarray:
  """The guided probability-flow ODE from x at t = T−1 to σ = 0, integrated in float64 (DDIM's
  form: d(x/√ᾱ)/d(σ/√ᾱ) = ε̃, Song et al. 2021, Eq. 14) to a 1e-10 tolerance."""
  from scipy.integrate import solve_ivp

  def derivative(sigma_bar, x_bar):
    a = 1 / (1 + sigma_bar**2)
    return guided_eps(x_bar * np.sqrt(a), a, label, w)

  start = math.sqrt((1 - AC[-1]) / AC[-1])
  solution = solve_ivp(derivative, (start, 0.0), x_T / math.sqrt(AC[-1]), rtol=1e-10, atol=1e-10)
  return solution.y[:, -1]


@pytest.mark.parametrize(('label', 'w'), [(0, 0.0), (1, 1.0), (0, 3.0)])
def test_guided_samplers_land_where_the_guided_score_leads(label, w):
  d = make()
  ac = jnp.asarray(AC, jnp.float32)

  def eps_fn(x, t):
    return guided_eps(x, ac[t][:, None], label, w, xp=jnp)

  x_T = jax.random.normal(jax.random.PRNGKey(5), (512, 1))
  exact = guided_flow(np.asarray(x_T, np.float64)[:, 0], label, w)
  key = jax.random.PRNGKey(0)
  dpm = jax.jit(
    lambda x: d.dpm_solver_loop(eps_fn, x.shape, key, num_steps=200, clip_denoised=False, x_T=x)
  )(x_T)
  assert np.abs(np.asarray(dpm)[:, 0] - exact).max() < 5e-3
  if w:  # guidance pushes the class apart from the other one, beyond its own mean
    assert abs(np.mean(exact) - MIX_MU[1 - label]) > abs(MIX_MU[label] - MIX_MU[1 - label])
