"""The FID/IS evaluator on 8 CPU devices: Inception's input, the reference statistics (computed
sharded over the first `eval.reference_num_examples`, cached via fid.save_stats, then reused) and
scoring exactly the first N samples, with random Inception weights (no download)."""

import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import unflatten_dict

from diffusion_jax import diffusion, evaluate, fid, input_pipeline, parallel, train_state
from diffusion_jax.evaluators import inception

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
  evaluator = inception.InceptionEvaluator(fake_inception_fn, 2.0, reference)
  sharding = parallel.replicated(mesh)  # any layout: rows are gathered whole
  chunks = (jax.device_put(x[i : i + 8], sharding) for i in (0, 8))
  metrics = evaluator(chunks, 10)
  pool3, logits = (np.asarray(a) for a in fake_inception_fn(2.0, x[:10]))
  expected_is, expected_is_std = fid.inception_score(logits, inception.NUM_IS_SPLITS)
  expected = {
    'fid': fid.frechet_distance(pool3.mean(0), np.cov(pool3, rowvar=False), *reference),
    'is': expected_is,
    'is_std': expected_is_std,
  }
  chex.assert_trees_all_close(metrics, expected, rtol=1e-6)


@pytest.fixture(scope='module')
def inception_config(data_dir, random_inception, tmp_path_factory):
  """configs/digits.py:tiny scored by FID/IS against the first 8 test digits."""
  config = load_config('digits.py:tiny', data_dir)
  config.eval.update(
    metrics='inception',
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
  inception_config, mesh, tmp_path, monkeypatch
):
  config = inception_config
  builder = input_pipeline.get_builder(config.dataset)
  factory = train_state.StateFactory.from_config(config)
  evaluator = evaluate.build_evaluator(
    config,
    tmp_path,
    builder,
    factory.model,
    diffusion.GaussianDiffusion.from_config(config.diffusion),
    mesh,
    image_shape=factory.image_shape,
    num_samples=10,
    nll_split=None,
  )
  assert (evaluator.reference_split, evaluator.reference_count) == ('test[:8]', 8)
  stats_dir = pathlib.Path(config.eval.reference_dir)
  assert [p.name for p in stats_dir.iterdir()] == ['sklearn_digits_8px_test_8_8.npz']
  mu, sigma, count = fid.load_stats(stats_dir / 'sklearn_digits_8px_test_8_8.npz')
  assert count == 8
  chex.assert_trees_all_equal((mu, sigma), evaluator.score.reference)

  # The sharded statistics are those of the 8 first test digits through Inception in one call.
  (batch,), _ = input_pipeline.create_eval_dataset(
    builder, config.dataset, 'test[:8]', batch_size=8
  )
  params = fid.load_params(config.eval.inception_path)
  pool3, _ = fid.inception_outputs(params, inception.inception_input(jnp.asarray(batch['image'])))
  pool3 = np.asarray(pool3, np.float64)
  np.testing.assert_allclose(mu, pool3.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(sigma, np.cov(pool3, rowvar=False), rtol=1e-3, atol=1e-6)

  metrics = evaluator(factory.create(mesh).ema_params).metrics
  assert set(metrics) == {'fid', 'is', 'is_std'}
  assert np.isfinite(metrics['fid']) and metrics['fid'] >= 0
  assert np.isfinite(metrics['is']) and metrics['is'] >= 1

  def no_recompute(*args, **kwargs):
    raise AssertionError('reference statistics recomputed instead of read from the cache')

  monkeypatch.setattr(input_pipeline, 'create_eval_dataset', no_recompute)
  again = evaluate.make_score_fn(
    config, tmp_path, builder, mesh, reference_split='test[:8]', batch_size=8
  )
  chex.assert_trees_all_equal(again.reference, evaluator.score.reference)
