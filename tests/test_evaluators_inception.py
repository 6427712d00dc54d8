"""The FID/IS evaluator on 8 CPU devices: Inception's input, the reference statistics (computed
sharded over the first `reference_num_examples`, cached via feature_metrics.save_stats, then
reused) and scoring exactly the first N samples, with random Inception weights (no download)."""

import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import unflatten_dict

from diffusion_jax import evaluate, feature_metrics, fid, input_pipeline, parallel
from diffusion_jax.evaluators import inception
from diffusion_jax.run import Run

from conftest import load_config


@pytest.fixture(scope='module')
def mesh():
  return parallel.make_mesh()


@pytest.fixture(scope='module')
def random_inception(tmp_path_factory) -> str:
  """An .npz of random FID Inception weights (He-scaled kernels, identity BatchNorm)."""
  rng = np.random.default_rng(0)
  flat = {}
  for name, shape in fid.param_shapes().items():
    leaf = name.rsplit('/', 1)[1]
    if leaf == 'kernel':
      flat[name] = rng.standard_normal(shape) * math.sqrt(2 / np.prod(shape[:-1]))
    else:
      flat[name] = (np.ones if leaf in ('scale', 'var') else np.zeros)(shape)
  path = tmp_path_factory.mktemp('inception') / 'inception_random.npz'
  fid.save_params(path, unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()}, sep='/'))
  return str(path)


def test_inception_input_is_the_8_bit_value_over_255_in_rgb():
  def before(x):  # the first release's formula
    x = jnp.clip(jnp.round((x + 1.0) * 127.5), 0.0, 255.0) / 255.0
    return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x

  gray = jnp.asarray(np.random.default_rng(0).uniform(-1.2, 1.2, (2, 4, 4, 1)), jnp.float32)
  for x in (gray, jnp.repeat(gray, 3, axis=-1)):
    for transform in (lambda f: f, jax.jit):
      out = transform(inception.inception_input)(x)
      np.testing.assert_array_equal(out, transform(before)(x))
      assert out.shape == (2, 4, 4, 3)
  np.testing.assert_allclose(
    inception.inception_input(gray)[..., 0], np.round((gray[..., 0] + 1) * 127.5).clip(0, 255) / 255
  )


def fake_inception_fn(params, x):
  """Features any function of the images can give: pixels tiled to 2048 dims, logits of 10."""
  flat = x.reshape(x.shape[0], -1)
  return jnp.tile(flat, (1, fid.POOL3_DIM // flat.shape[1])) * params, flat[:, :10] * params


@pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')  # 10 samples, 2048 dims
def test_evaluator_scores_exactly_the_first_n_samples(mesh):
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)
  reference_features = rng.normal(size=(50, fid.POOL3_DIM))
  reference = (reference_features.mean(0), np.cov(reference_features, rowvar=False))
  evaluator = inception.InceptionScore(fake_inception_fn, 2.0, reference)
  sharding = parallel.replicated(mesh)  # any layout: rows are gathered whole
  chunks = (jax.device_put(x[i : i + 8], sharding) for i in (0, 8))
  metrics = evaluator(chunks, 10)
  pool3, logits = (np.asarray(a) for a in fake_inception_fn(2.0, x[:10]))
  expected_is, expected_is_std = feature_metrics.inception_score(logits, inception.NUM_IS_SPLITS)
  expected = {
    'fid': feature_metrics.frechet_distance(pool3.mean(0), np.cov(pool3, rowvar=False), *reference),
    'is': expected_is,
    'is_std': expected_is_std,
  }
  chex.assert_trees_all_close(metrics, expected, rtol=1e-6)


@pytest.fixture(scope='module')
def inception_config(data_dir, random_inception, tmp_path_factory):
  """configs/digits.py:tiny scored by FID/IS against the first 8 test digits."""
  config = load_config('digits.py:tiny', data_dir)
  config.evals.fid = load_config('cifar10.py').evals.fid
  del config.evals['digits']
  config.evals.fid.update(
    inception_path=random_inception,
    reference_split='test',
    reference_num_examples=8,
    reference_dir=str(tmp_path_factory.mktemp('stats')),
    num_samples=10,
    batch_size=8,
  )
  return config


@pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')  # 10 samples, 2048 dims
def test_reference_of_the_first_examples_is_computed_once_then_read(
  inception_config, tmp_path, monkeypatch
):
  config = inception_config
  run = Run.create(config, tmp_path)
  evaluator = inception.create('fid', config.evals.fid, run, in_loop=False)
  assert (evaluator.reference['reference_split'], evaluator.reference['reference_count']) == (
    'test[:8]',
    8,
  )
  stats_dir = pathlib.Path(config.evals.fid.reference_dir)
  assert [p.name for p in stats_dir.iterdir()] == ['sklearn_digits_8px_test_8_8.npz']
  mu, sigma, count = feature_metrics.load_stats(stats_dir / 'sklearn_digits_8px_test_8_8.npz')
  assert count == 8
  chex.assert_trees_all_equal((mu, sigma), evaluator.score.reference)

  # The sharded statistics are those of the 8 first test digits through Inception in one call.
  (batch,), _ = input_pipeline.create_eval_dataset(
    run.builder, config.dataset, 'test[:8]', batch_size=8
  )
  params = fid.load_params(config.evals.fid.inception_path)
  pool3, _ = fid.inception_outputs(params, inception.inception_input(jnp.asarray(batch['image'])))
  pool3 = np.asarray(pool3, np.float64)
  np.testing.assert_allclose(mu, pool3.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(sigma, np.cov(pool3, rowvar=False), rtol=1e-3, atol=1e-6)

  result = evaluator(run.initial_state().ema_params, evaluate.evaluator_key(run, 'fid'))
  assert set(result.scalars) == {'fid', 'is', 'is_std'} and 'samples.png' in result.files
  assert np.isfinite(result.scalars['fid']) and result.scalars['fid'] >= 0
  assert np.isfinite(result.scalars['is']) and result.scalars['is'] >= 1

  def no_recompute(*args, **kwargs):
    raise AssertionError('reference statistics recomputed instead of read from the cache')

  monkeypatch.setattr(input_pipeline, 'create_eval_dataset', no_recompute)
  again = inception.create('fid', config.evals.fid, run, in_loop=True)
  chex.assert_trees_all_equal(again.score.reference, evaluator.score.reference)
