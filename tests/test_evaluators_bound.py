"""The sharded bound (Eq. 5) on 8 CPU devices: against the unsharded one and its closed form on
Gaussian data, padding, and the per-t table's CSV and plot."""

import dataclasses
import io
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import diffusion, parallel
from diffusion_jax.evaluators import bound

from gaussian_reference import MU, S, expected_bound_bits, optimal_eps_fn

BETAS = diffusion.get_beta_schedule(
  'linear', beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=1000
)
NUM_EXAMPLES, DIM = 240, 16
EPS_FN = optimal_eps_fn(np.cumprod(1 - BETAS))


@pytest.fixture(scope='module')
def mesh():
  return parallel.make_mesh()


@pytest.fixture(scope='module')
def gaussian():
  """The fixedsmall process and 8-bit N(0.2, 0.3²) data [240, 16]."""
  d = diffusion.GaussianDiffusion(BETAS, 'eps', 'fixedsmall', 'mse')
  x0 = np.random.default_rng(7).normal(MU, S, (NUM_EXAMPLES, DIM))
  x0 = (np.clip(np.round((x0 + 1) * 127.5), 0, 255) / 127.5 - 1).astype(np.float32)
  return d, x0


def batched(x: np.ndarray, batch_size: int) -> list[dict[str, np.ndarray]]:
  """Batches of `batch_size` rows; the last one padded with NaN rows of mask 0."""
  batches = []
  for start in range(0, len(x), batch_size):
    rows = x[start : start + batch_size]
    pad = batch_size - len(rows)
    batches.append(
      {
        'image': np.concatenate([rows, np.full((pad, *x.shape[1:]), np.nan, x.dtype)]),
        'mask': np.concatenate([np.ones(len(rows)), np.zeros(pad)]).astype(np.float32),
      }
    )
  return batches


@pytest.fixture(scope='module')
def bpd_fn(gaussian, mesh):
  """The sharded bound of the analytic-optimal ε-model (it has no params)."""
  return bound.make_bpd_fn(lambda params: EPS_FN, gaussian[0], mesh, clip_denoised=False)


@pytest.fixture(scope='module')
def padded_run(gaussian, bpd_fn, mesh):
  """Per-example bounds and the NllResult of 240 examples in 2 batches of 128 (16 padded)."""
  _, x0 = gaussian
  rng = jax.random.PRNGKey(8)
  batches = batched(x0, 128)
  per_example = np.concatenate(
    [
      np.asarray(bpd_fn(None, jnp.asarray(b['image']), jnp.asarray(b['mask']), 128 * i, rng)[0])
      for i, b in enumerate(batches)
    ]
  )
  result = bound.nll_bits_per_dim(bpd_fn, None, batches, mesh, rng)
  return per_example[:NUM_EXAMPLES], result, rng


def test_sharded_bound_is_the_unsharded_one_and_matches_the_closed_form(gaussian, padded_run):
  d, x0 = gaussian
  per_example, result, rng = padded_run
  unsharded = jax.jit(
    lambda x, key: d.calc_bpd_loop(EPS_FN, x, key, clip_denoised=False)['total_bpd']
  )
  for i in (0, 17, 100, 130, 239):  # several devices of both batches
    np.testing.assert_allclose(
      per_example[i], unsharded(x0[i : i + 1], jax.random.fold_in(rng, i))[0], rtol=1e-5
    )
  assert result.num_examples == NUM_EXAMPLES
  np.testing.assert_allclose(result.total_bpd, per_example.mean(), rtol=1e-5)
  se = per_example.std() / math.sqrt(NUM_EXAMPLES)
  assert abs(result.total_bpd - expected_bound_bits(BETAS, MU, S)) < 4 * se + 0.01


def test_masked_padding_does_not_change_the_average(gaussian, bpd_fn, padded_run, mesh):
  _, x0 = gaussian
  _, padded, rng = padded_run
  unpadded = bound.nll_bits_per_dim(bpd_fn, None, batched(x0, 120), mesh, rng)  # same example ids
  chex.assert_trees_all_close(
    dataclasses.asdict(padded), dataclasses.asdict(unpadded), rtol=1e-4, atol=1e-7
  )


def test_all_masked_is_an_error(bpd_fn, mesh):
  empty = {'image': np.zeros((8, DIM), np.float32), 'mask': np.zeros(8, np.float32)}
  with pytest.raises(ValueError, match='no examples'):
    bound.nll_bits_per_dim(bpd_fn, None, [empty], mesh, jax.random.PRNGKey(0))


def test_csv_rows_sum_to_the_total_and_plot_is_three_panels(padded_run):
  _, result, _ = padded_run
  files = bound.nll_files(result)
  assert set(files) == {'nll_terms.csv', 'nll_terms.png'}
  csv = files['nll_terms.csv'].decode()
  assert csv == bound.nll_csv(result)
  assert csv.splitlines()[0] == 't,term_bpd,cumulative_rate_bpd,distortion_rmse'
  table = np.genfromtxt(io.StringIO(csv), delimiter=',', names=True)
  assert len(table) == len(BETAS)
  np.testing.assert_array_equal(table['t'], np.arange(len(BETAS)))
  np.testing.assert_allclose(
    table['term_bpd'].sum() + result.prior_bpd, result.total_bpd, rtol=1e-6
  )
  np.testing.assert_allclose(table['cumulative_rate_bpd'][0], result.total_bpd, rtol=1e-6)
  assert table['distortion_rmse'][0] == 0 and np.all(np.diff(table['cumulative_rate_bpd']) <= 1e-6)
  np.testing.assert_allclose(
    table['distortion_rmse'][1:], 127.5 * np.sqrt(result.xstart_mse[:-1]), rtol=1e-6
  )
  plot = Image.open(io.BytesIO(files['nll_terms.png']))
  assert plot.format == 'PNG' and plot.size == (1500, 400)  # 15 x 4 inches at 100 dpi
  assert len(np.unique(np.asarray(plot.convert('L')))) > 2  # drawn, not blank
