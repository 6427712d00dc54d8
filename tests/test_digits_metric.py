"""Digits domain metric: the cached, deterministic classifier, FD / confidence / class balance on
real digits and on inputs that must fail (noise, blank), and the command line (tmp data dir, no
network)."""

import os
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import digits_classifier as dc
from diffusion_jax import digits_metric as dm
from diffusion_jax import feature_metrics, input_pipeline

from conftest import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def builder(data_dir):
  """The prepared sklearn_digits builder of configs/digits.py on the session's data dir."""
  return input_pipeline.get_builder(load_config('digits.py', data_dir).dataset)


@pytest.fixture(scope='session')
def classifier(builder):
  # Trains once (~15-30 s on 2 cores) and caches under the data dir.
  return dc.load_or_train_classifier(builder)


@pytest.fixture(scope='session')
def test_digits(builder):
  return dc.load_split(builder, 'test')


@pytest.fixture(scope='session')
def train_ref(builder, classifier):
  return dm.reference_stats(builder, 'train', classifier=classifier)


def test_classifier_accuracy_and_test_split(classifier, test_digits):
  images, labels = test_digits
  assert images.shape == (300, 8, 8, 1) and images.dtype == np.uint8
  assert classifier.test_accuracy >= 0.95
  assert classifier.accuracy(images, labels) == pytest.approx(classifier.test_accuracy)


def test_training_is_deterministic_and_cached(builder, classifier, monkeypatch):
  images, labels = dc.load_split(builder, 'train')
  # Determinism on short runs (the full run takes ~15 s; it is a loop of these same steps).
  first = dc.train_params(images, labels, steps=40)
  chex.assert_trees_all_equal(dc.train_params(images, labels, steps=40), first)
  other_seed = dc.train_params(images, labels, steps=40, seed=1)
  assert not all(
    np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other_seed))
  )
  trained = []
  monkeypatch.setattr(dc, 'train_params', lambda *a, **k: trained.append(1) or classifier.params)
  path = dc.classifier_path(dc.default_cache_dir(builder))
  mtime = path.stat().mtime
  loaded = dc.load_or_train_classifier(builder)  # from the cache the fixture wrote
  chex.assert_trees_all_equal(loaded.params, classifier.params)
  assert loaded.test_accuracy == classifier.test_accuracy and path.stat().mtime == mtime
  assert trained == []
  # Another training recipe is another cache key: the cached classifier is not used for it.
  monkeypatch.setitem(dc.TRAIN_HPARAMS, 'steps', dc.TRAIN_HPARAMS['steps'] + 1)
  assert dc.classifier_key() != classifier.key
  cache_dir = dc.default_cache_dir(builder)
  assert dc.load_or_train_classifier(builder, cache_dir=cache_dir).key == dc.classifier_key()
  assert trained == [1]
  dc.classifier_path(cache_dir).unlink()


@pytest.mark.parametrize('damage', ['garbage', 'truncated', 'other_version', 'wrong_shapes'])
def test_bad_cache_is_retrained(builder, classifier, tmp_path, monkeypatch, damage):
  path = dc.classifier_path(tmp_path)
  good = dc.classifier_path(dc.default_cache_dir(builder)).read_bytes()
  if damage == 'garbage':
    path.write_bytes(b'not an npz')
  elif damage == 'truncated':
    path.write_bytes(good[: len(good) // 2])
  else:
    params = classifier.params
    if damage == 'wrong_shapes':
      params = jax.tree.map(lambda x: x[..., :1], params)
    key = 'digits-cnn-v1-deadbeef' if damage == 'other_version' else classifier.key
    dc.save_classifier(path, dc.DigitsClassifier(params, key, 1.0))
  calls = []

  def train(*args, **kwargs):  # stands in for training: returns the known params at once
    calls.append(1)
    return classifier.params

  monkeypatch.setattr(dc, 'train_params', train)
  retrained = dc.load_or_train_classifier(builder, cache_dir=tmp_path)
  assert calls == [1]
  chex.assert_trees_all_equal(retrained.params, classifier.params)
  assert retrained.test_accuracy == pytest.approx(classifier.test_accuracy)
  reloaded = dc.load_or_train_classifier(builder, cache_dir=tmp_path)
  chex.assert_trees_all_equal(reloaded.params, classifier.params)
  assert calls == [1]  # the rewritten cache loads


def test_features_and_probs(classifier, test_digits):
  images = test_digits[0]
  features, probs = classifier.features_and_probs(images[:7])
  assert features.shape == (7, dc.FEATURE_DIM) and probs.shape == (7, 10)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
  many = np.concatenate([images] * 4)  # 1200 images: batches of 500, the last one padded
  many_features = classifier.features_and_probs(many)[0]
  for start in (0, 600, 900):  # images 0..6 in the first, second and last (padded) batch
    np.testing.assert_allclose(many_features[start : start + 7], features, rtol=1e-5, atol=1e-5)
  with pytest.raises(TypeError, match='uint8'):
    classifier.features_and_probs(images.astype(np.float32) / 127.5 - 1)
  with pytest.raises(ValueError, match=r'\[N, 8, 8, 1\]'):
    classifier.features_and_probs(images[..., 0])
  with pytest.raises(ValueError, match=r'\[N, 8, 8, 1\]'):  # e.g. samples of an old 16x16 model
    classifier.features_and_probs(np.zeros((2, 16, 16, 1), np.uint8))


def test_reference_stats_are_cached(builder, classifier, train_ref, tmp_path, monkeypatch):
  # The cache is fid's statistics file, with the split's image count.
  cached = dc.default_cache_dir(builder) / f'ref_{classifier.key}_train_n1497.npz'
  mu, sigma, num_images = feature_metrics.load_stats(cached)
  assert num_images == 1497
  np.testing.assert_array_equal(mu, train_ref[0])
  assert mu.shape == (dc.FEATURE_DIM,) and sigma.shape == (dc.FEATURE_DIM, dc.FEATURE_DIM)
  eigenvalues = np.linalg.eigvalsh(sigma)  # full-rank, well-conditioned features (no dead units)
  assert eigenvalues.min() > 1e-6 * eigenvalues.max()
  # A stale file (another count) is recomputed; a good one is read.
  stale = tmp_path / cached.name
  feature_metrics.save_stats(stale, mu + 1, sigma, 1000)
  recomputed = dm.reference_stats(builder, 'train', classifier=classifier, cache_dir=tmp_path)
  chex.assert_trees_all_close(recomputed, train_ref, rtol=1e-10)
  monkeypatch.setattr(
    dm, 'feature_stats', lambda *a: pytest.fail('reference stats were recomputed')
  )
  for cache_dir in (None, tmp_path):
    got = dm.reference_stats(builder, 'train', classifier=classifier, cache_dir=cache_dir)
    chex.assert_trees_all_close(got, train_ref, rtol=1e-10)


def test_real_digits_score_well(builder, classifier, test_digits, train_ref):
  metrics = dm.digits_metrics(classifier, test_digits[0], train_ref)
  assert metrics['num_images'] == 300
  assert metrics['confident_fraction'] >= 0.8
  assert len(metrics['class_histogram']) == 10
  assert sum(metrics['class_histogram']) == pytest.approx(1.0)
  assert 0.05 <= metrics['min_class_fraction'] <= metrics['max_class_fraction'] <= 0.15
  assert 0 <= metrics['fd'] < 15
  baseline = dm.real_digits_baseline(builder, classifier=classifier)
  assert baseline['accuracy'] == pytest.approx(classifier.test_accuracy)
  assert {k: v for k, v in baseline.items() if k != 'accuracy'} == metrics


# Blank images: an all-zero feature covariance.
@pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')
def test_noise_and_blank_images_fail(classifier, test_digits, train_ref):
  real = dm.digits_metrics(classifier, test_digits[0], train_ref)
  rng = np.random.default_rng(0)
  noise = np.clip(np.round(rng.normal(127.5, 127.5, (300, 8, 8, 1))), 0, 255).astype(np.uint8)
  blank = np.zeros((300, 8, 8, 1), np.uint8)
  for name, images in (('noise', noise), ('blank', blank)):
    metrics = dm.digits_metrics(classifier, images, train_ref)
    assert metrics['fd'] > max(10 * real['fd'], 100), name
    assert metrics['max_class_fraction'] >= 0.3 and metrics['min_class_fraction'] <= 0.02, name
  # Neither is mostly classified confidently (though many noise images are: see dm's docstring).
  assert dm.digits_metrics(classifier, noise, train_ref)['confident_fraction'] < 0.7
  assert dm.digits_metrics(classifier, blank, train_ref)['confident_fraction'] < 0.7


def test_fd_of_features_with_themselves_is_zero(builder, classifier, test_digits):
  features = classifier.features_and_probs(test_digits[0])[0]
  stats = feature_metrics.FeatureStats(dc.FEATURE_DIM)
  stats.update(features)
  mu, sigma = stats.mean_cov()
  assert abs(feature_metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
  test_ref = dm.reference_stats(builder, 'test', classifier=classifier)
  assert abs(dm.digits_metrics(classifier, test_digits[0], test_ref)['fd']) < 1e-6 * np.trace(sigma)


def test_only_digits_builders(builder, classifier, tmp_path):
  other = tfds.builder('cifar10', data_dir=str(tmp_path))  # not prepared: never read
  for call in (
    lambda: dc.load_or_train_classifier(other),
    lambda: dc.load_split(other, 'test'),
    lambda: dm.reference_stats(other, classifier=classifier),
  ):
    with pytest.raises(ValueError, match="only scores 'sklearn_digits'.*'cifar10'"):
      call()
  with pytest.raises(ValueError, match='differ'):
    dm.real_digits_baseline(builder, 'test', ref_split='test', classifier=classifier)


def test_samples_report_matches_image_counts(builder, classifier, test_digits):
  few, baseline = dm.samples_report(builder, test_digits[0][:100])
  assert few['num_images'] == 100 and baseline['split'] == 'test' and 'fd_n100' in baseline
  assert baseline['fd_n100'] > baseline['fd']  # FD grows as the image count falls
  many, _ = dm.samples_report(builder, np.concatenate([test_digits[0]] * 2))
  # Two identical chunks of the test split.
  assert many['fd_n300'] == pytest.approx(baseline['fd'], rel=1e-6)


def test_command_line(data_dir, classifier, test_digits, tmp_path):
  npz = tmp_path / 'samples.npz'
  np.savez_compressed(npz, images=np.concatenate([test_digits[0]] * 2), step=np.int64(7))
  command = [
    sys.executable,
    '-m',
    'diffusion_jax.digits_metric',
    f'--npz={npz}',
    f'--config.dataset.data_dir={data_dir}',  # config overrides work as in diffusion_jax.main
  ]
  result = subprocess.run(
    command, cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=120, check=False
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'trained the digits classifier' not in result.stderr  # used the cache
  out = result.stdout
  assert dc.classifier_key() in out and '(step 7)' in out and "real 'test' digits (baseline)" in out
  assert 'fd_n300' in out and 'confident_fraction' in out and 'class_histogram' in out
