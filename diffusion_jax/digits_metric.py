"""Domain metric for ``sklearn_digits``: a small classifier's Fréchet distance, confidence and
class balance.

FID's Inception weights are not bundled, so digits samples are scored with a small CNN trained
deterministically on the digits TRAIN split and cached (``digits_classifier``):

  fd                  Fréchet distance between the images' 64-d penultimate features (before
                      their ReLU) and a real split's (``feature_metrics.FeatureStats`` and
                      ``frechet_distance``). Like FID it grows as the image count falls, so
                      compare numbers at the same count.
  confident_fraction  fraction of images whose top class probability is > ``confidence`` (0.9).
  class_histogram     fraction of images per predicted class 0..9 (real digits: ~0.1 each);
                      min_class_fraction / max_class_fraction summarize it.

Images are uint8 [N, 8, 8, 1] (what ``--mode=sample`` saves). Functions take the prepared TFDS
builder (``input_pipeline.get_builder(config.dataset)``). The baseline (``real_digits_baseline``)
is the held-out TEST digits scored against the TRAIN-split reference: what a generator of fresh
digits from the data distribution would get (at 300 images). Score samples against the same
reference, from the repository root:

  python -m diffusion_jax.digits_metric --npz=WORKDIR/samples/ema_step_XXXXXXXX_nN.npz \\
      [--data_dir=DIR]

Caveat: like any classifier it is over-confident on some non-digits (many pure-noise images get
a confident class), so read confident_fraction together with the histogram and fd.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from diffusion_jax import feature_metrics, input_pipeline, npz
from diffusion_jax.digits_classifier import (
  FEATURE_DIM,
  NUM_CLASSES,
  DigitsClassifier,
  check_builder,
  check_images,
  classifier_key,
  default_cache_dir,
  load_or_train_classifier,
  load_split,
)

DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'digits.py')
FLAGS = flags.FLAGS


def feature_stats(
  classifier: DigitsClassifier, images: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Float64 mean (64,) and covariance (64, 64) of the images' classifier features."""
  stats = feature_metrics.FeatureStats(FEATURE_DIM)
  stats.update(classifier.features_and_probs(images)[0])
  return stats.mean_cov()


def _cached_reference(path: epath.Path, count: int) -> tuple[np.ndarray, np.ndarray] | None:
  """The reference statistics cached at ``path`` if they are usable, else None."""
  if not path.exists():
    return None
  try:
    mu, sigma, num = feature_metrics.load_stats(path)
    if num == count and mu.shape == (FEATURE_DIM,) and sigma.shape == (FEATURE_DIM, FEATURE_DIM):
      return mu, sigma
    raise ValueError(f'shapes {mu.shape}, {sigma.shape} / count {num} do not match')
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('digits reference stats %s are unusable (%s); recomputing.', path, e)
    return None


def reference_stats(
  builder: tfds.core.DatasetBuilder,
  split: str = 'test',
  *,
  classifier: DigitsClassifier | None = None,
  cache_dir: epath.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """FD reference (mean, cov) of a real split's features, cached (``save_stats``'s format) as
  ``<cache_dir>/ref_<classifier key>_<split>_n<count>.npz``."""
  check_builder(builder)
  cache_dir = epath.Path(cache_dir if cache_dir is not None else default_cache_dir(builder))
  classifier = classifier or load_or_train_classifier(builder, cache_dir=cache_dir)
  count = builder.info.splits[split].num_examples
  path = cache_dir / f'ref_{classifier.key}_{re.sub(r"[^A-Za-z0-9]+", "_", split)}_n{count}.npz'
  cached = _cached_reference(path, count)
  if cached is not None:
    return cached
  images, _ = load_split(builder, split)
  mu, sigma = feature_stats(classifier, images)
  feature_metrics.save_stats(path, mu, sigma, len(images))
  return mu, sigma


def digits_metrics(
  classifier: DigitsClassifier,
  images: np.ndarray,
  ref_stats: Sequence[np.ndarray],
  confidence: float = 0.9,
  labels: np.ndarray | None = None,
) -> dict[str, Any]:
  """fd (against ``ref_stats``' (mean, cov)), confident_fraction, class_histogram,
  min/max_class_fraction and num_images; with the ``labels`` each image was asked to be,
  class_accuracy: the fraction the classifier gives that class."""
  images = check_images(images)
  if len(images) < 2:
    raise ValueError(f'digits_metrics needs at least 2 images, got {len(images)}')
  features, probs = classifier.features_and_probs(images)
  stats = feature_metrics.FeatureStats(FEATURE_DIM)
  stats.update(features)
  fd = feature_metrics.frechet_distance(*stats.mean_cov(), ref_stats[0], ref_stats[1])
  histogram = np.bincount(probs.argmax(axis=1), minlength=NUM_CLASSES) / len(images)
  asked = {}
  if labels is not None:
    asked['class_accuracy'] = float(np.mean(probs.argmax(axis=1) == np.asarray(labels)))
  return {
    **asked,
    'num_images': len(images),
    'fd': fd,
    'confident_fraction': float(np.mean(probs.max(axis=1) > confidence)),
    'class_histogram': [float(h) for h in histogram],
    'min_class_fraction': float(histogram.min()),
    'max_class_fraction': float(histogram.max()),
  }


def real_digits_baseline(
  builder: tfds.core.DatasetBuilder,
  split: str = 'test',
  *,
  ref_split: str = 'train',
  classifier: DigitsClassifier | None = None,
  cache_dir: epath.PathLike | None = None,
  confidence: float = 0.9,
) -> dict[str, Any]:
  """``digits_metrics`` of the real ``split`` digits against the ``ref_split`` reference, plus
  their accuracy."""
  if split == ref_split:
    raise ValueError(
      f'the baseline scores held-out digits: split and ref_split must differ, both are {split!r}'
    )
  classifier = classifier or load_or_train_classifier(builder, cache_dir=cache_dir)
  ref = reference_stats(builder, ref_split, classifier=classifier, cache_dir=cache_dir)
  images, labels = load_split(builder, split)
  metrics = digits_metrics(classifier, images, ref, confidence)
  metrics['accuracy'] = classifier.accuracy(images, labels)
  return metrics


def chunked_fd(
  classifier: DigitsClassifier, images: np.ndarray, ref_stats: Sequence[np.ndarray], chunk: int
) -> float | None:
  """Mean FD over disjoint chunks of ``chunk`` images (None if fewer): FD at a matched count."""
  images = check_images(images)
  if len(images) < chunk:
    return None
  features = classifier.features_and_probs(images)[0]
  fds = []
  for start in range(0, len(images) - chunk + 1, chunk):
    stats = feature_metrics.FeatureStats(FEATURE_DIM)
    stats.update(features[start : start + chunk])
    fds.append(feature_metrics.frechet_distance(*stats.mean_cov(), ref_stats[0], ref_stats[1]))
  return float(np.mean(fds))


def samples_report(
  builder: tfds.core.DatasetBuilder,
  images: np.ndarray,
  *,
  ref_split: str = 'train',
  cache_dir: epath.PathLike | None = None,
  confidence: float = 0.9,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """(samples' metrics, real-digit baseline) against ``ref_split``, each with fd_n<k> at the
  smaller image count."""
  classifier = load_or_train_classifier(builder, cache_dir=cache_dir)
  ref = reference_stats(builder, ref_split, classifier=classifier, cache_dir=cache_dir)
  metrics = digits_metrics(classifier, images, ref, confidence)
  baseline_split = 'test' if ref_split != 'test' else 'train'
  baseline = real_digits_baseline(
    builder,
    baseline_split,
    ref_split=ref_split,
    classifier=classifier,
    cache_dir=cache_dir,
    confidence=confidence,
  )
  baseline['split'] = baseline_split
  # FD is biased by the image count: also compare at a matched count (mean over disjoint chunks).
  n, n_real = len(images), baseline['num_images']
  if n > n_real:
    metrics[f'fd_n{n_real}'] = chunked_fd(classifier, images, ref, n_real)
  elif n < n_real:
    baseline[f'fd_n{n}'] = chunked_fd(classifier, load_split(builder, baseline_split)[0], ref, n)
  return metrics, baseline


# ----------------------------------------------------------------------------- command line


def _format(metrics: Mapping[str, Any]) -> str:
  """One line per metric, the histogram as percentages."""
  lines = []
  for name, value in metrics.items():
    if name == 'class_histogram':
      value = ' '.join(f'{i}:{100 * h:.1f}%' for i, h in enumerate(value))
    elif isinstance(value, float):
      value = f'{value:.4f}'
    lines.append(f'  {name:<20} {value}')
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  """Prints the digits metrics of an .npz of samples next to the real-digit baseline."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  tf.config.set_visible_devices([], 'GPU')  # TF only reads data
  config = FLAGS.config
  if FLAGS.data_dir is not None:
    config.dataset.data_dir = FLAGS.data_dir
  builder = input_pipeline.get_builder(config.dataset)
  data = npz.read(FLAGS.npz)
  if 'images' not in data:
    raise SystemExit(f'error: {FLAGS.npz} has no `images` array (it has {sorted(data)})')
  images = data['images']
  step = int(data['step']) if 'step' in data else None
  metrics, baseline = samples_report(
    builder,
    images,
    ref_split=FLAGS.ref_split,
    cache_dir=FLAGS.cache_dir,
    confidence=FLAGS.confidence,
  )
  if FLAGS.json:
    report = {'npz': FLAGS.npz, 'step': step, 'ref_split': FLAGS.ref_split}
    print(json.dumps({**report, 'samples': metrics, 'baseline': baseline}))
    return
  n, n_real = len(images), baseline['num_images']
  print(f'digits metric {classifier_key()}; FD reference: the {FLAGS.ref_split!r} split.')
  print(f'samples: {FLAGS.npz}' + (f' (step {step})' if step is not None else ''))
  print(_format(metrics))
  print(f'real {baseline.pop("split")!r} digits (baseline):')
  print(_format(baseline))
  if n != n_real:
    print(
      f'note: FD grows as the image count falls; compare fd_n{min(n, n_real)} of both '
      f'(mean over disjoint chunks of {min(n, n_real)} images).'
    )


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing never clashes)."""
  flags.DEFINE_string(
    'npz', None, 'An .npz with `images` uint8 [N, 8, 8, 1] (as --mode=sample writes).'
  )
  config_flags.DEFINE_config_file(
    'config',
    DEFAULT_CONFIG,
    'The training config file (its dataset.data_dir holds the digits and the classifier cache).',
  )
  flags.DEFINE_string(
    'data_dir', None, 'Overrides config.dataset.data_dir (the TFDS dir training used).'
  )
  flags.DEFINE_string(
    'cache_dir', None, 'Classifier/reference cache (default: <data_dir>/sklearn_digits_classifier).'
  )
  flags.DEFINE_string(
    'ref_split', 'train', 'Real split of the FD reference; the baseline is the other split.'
  )
  flags.DEFINE_float(
    'confidence', 0.9, 'A sample is confident if its top class probability exceeds this.'
  )
  flags.DEFINE_bool('json', False, 'Print one JSON object instead of the table.')
  flags.mark_flag_as_required('npz')


if __name__ == '__main__':
  define_flags()
  app.run(main)
