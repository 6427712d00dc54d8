"""The paper's figures: interpolation (Fig. 8) and rate-distortion (Fig. 5) on Gaussian data with
the analytic-optimal ε-model, and ``make_figures`` end to end on a tiny digits run."""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from diffusion_jax import diffusion, figures, models, train
from diffusion_jax.run import Run

from gaussian_reference import MU, S, optimal_eps_fn

BETAS = diffusion.get_beta_schedule(
  'linear', beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=1000
)


def test_interpolation_at_0_and_1_gives_back_the_endpoints_encodings():
  d = diffusion.GaussianDiffusion(BETAS, 'eps', 'fixedsmall', 'mse')
  a, b = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 8, 8, 1))
  noise = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 1))
  x_a, x_b = (figures.q_encode(d, x, 499, noise)[0] for x in (a, b))
  latents = figures.mix(x_a, x_b, figures.LAMBDAS)
  np.testing.assert_array_equal(latents[0], x_a)
  np.testing.assert_array_equal(latents[-1], x_b)
  np.testing.assert_allclose(latents[4], 0.5 * (x_a + x_b), rtol=1e-6, atol=1e-7)


def test_rate_distortion_total_is_the_bound_and_distortion_falls_to_the_decoders():
  d = diffusion.GaussianDiffusion(BETAS, 'eps', 'fixedsmall', 'mse')
  eps_fn = optimal_eps_fn(np.cumprod(1 - BETAS))
  x = np.random.default_rng(0).normal(MU, S, (64, 64))
  x = jnp.asarray(np.clip(np.round((x + 1) * 127.5), 0, 255) / 127.5 - 1, jnp.float32)
  rng = jax.random.PRNGKey(3)
  curve = figures.rate_distortion(d, eps_fn, x, rng, clip_denoised=False)
  table = curve.table()
  bound = jax.jit(lambda x: d.calc_bpd_loop(eps_fn, x, rng, False)['total_bpd'])(x)
  np.testing.assert_allclose(table['cumulative_rate_bpd'][0], np.mean(bound), rtol=1e-5)
  np.testing.assert_allclose(table['cumulative_rate_bpd'][0], curve.total_bpd, rtol=1e-6)
  distortion = table['distortion_rmse']
  assert distortion[0] == 0  # x_0 itself is known once every term is sent
  # x̂_0 = E[x_0 | x_t] for Gaussian data: its error has variance s²(1−ᾱ)/(ᾱ s² + 1 − ᾱ); row t
  # holds the distortion of x̂_0 predicted from x_t (code step t − 1).
  ac = np.cumprod(1 - BETAS)[:-1]
  expected = 127.5 * np.sqrt(S**2 * (1 - ac) / (ac * S**2 + 1 - ac))
  np.testing.assert_allclose(distortion[1:], expected, rtol=0.05)  # 4096 values per t
  assert np.all(np.diff(distortion[1:400:50]) > 0)  # falls monotonically to the decoder's
  assert np.all(np.diff(table['cumulative_rate_bpd']) <= 1e-6)  # rate grows toward t = 0


def test_make_figures_writes_every_figure(tiny_config, tmp_path):
  tiny_config.train.update(num_train_steps=2, checkpoint_every_steps=2)
  run = Run.create(tiny_config, tmp_path)
  train.train_and_evaluate(run)
  paths = figures.make_figures(run, num_test=4)
  names = {'progressive', 'shared_latents', 'interpolation', 'ddim_interpolation'}
  assert names <= set(paths)
  for name in names:
    with Image.open(paths[name]) as image:
      assert min(image.size) >= 256 and image.getextrema() != (0, 0)
  rows = paths['nll_terms.csv'].read_text().splitlines()
  assert rows[0] == 't,term_bpd,cumulative_rate_bpd,distortion_rmse'
  assert len(rows) == 1 + tiny_config.diffusion.num_diffusion_timesteps
  assert paths['nll_terms.png'].name == 'rate_distortion.png'


def test_the_sample_config_picks_the_sampler_everywhere(tiny_config):
  """``sample.method``/``num_steps``/``eta`` select DDIM, DPM-Solver++ or respaced ancestral
  sampling."""
  run = Run.create(tiny_config, devices=jax.devices()[:1])
  params = run.initial_state().ema_params
  d = run.process
  model_fn = models.model_fn(run.model, params)
  key = jax.random.PRNGKey(5)
  shape = (2, *run.image_shape)
  for method, num_steps, eta, direct in [
    ('ddim', 5, 0.0, lambda r: d.ddim_sample_loop(model_fn, shape, r, num_steps=5)),
    ('ddim', None, 1.0, lambda r: d.ddim_sample_loop(model_fn, shape, r, eta=1.0)),
    ('dpm_solver++', 6, 0.0, lambda r: d.dpm_solver_loop(model_fn, shape, r, num_steps=6)),
    ('ancestral', 10, 0.0, lambda r: d.respaced(10).p_sample_loop(model_fn, shape, r)),
    ('ancestral', None, 0.0, lambda r: d.p_sample_loop(model_fn, shape, r)),
  ]:
    tiny_config.sample.update(method=method, num_steps=num_steps, eta=eta)
    sample_fn = Run.create(tiny_config, devices=jax.devices()[:1]).sample_fn(2)
    np.testing.assert_allclose(
      sample_fn(params, key, 0), jax.jit(direct)(jax.random.fold_in(key, 0)), atol=1e-5
    )
