"""Domain metric for `sklearn_digits`: a small classifier's Fréchet distance, confidence and class balance.

FID's Inception weights are not bundled, so digits samples are scored with a small CNN trained
deterministically on the digits TRAIN split (~15-30 s on 2 CPU cores, then cached as .npz):

  fd                   Fréchet distance between the images' 64-d penultimate features (before their ReLU)
                       and a real split's (`fid.FeatureStats` + `fid.frechet_distance`). Like FID it grows
                       as the image count falls, so compare numbers at the same count.
  confident_fraction   fraction of images whose top class probability is > `confidence` (0.9).
  class_histogram      fraction of images per predicted class 0..9 (real digits: ~0.1 each);
                       min_class_fraction / max_class_fraction summarize it.

Images are uint8 [N, 8, 8, 1] (what `--mode=sample` saves); the network sees x / 127.5 - 1 like
the diffusion model. The baseline (`real_digits_baseline`) is the held-out TEST digits scored against
the TRAIN-split reference: what a generator of fresh digits from the data distribution would get
(at 300 images). Score samples against the same reference, from the repository root:

  python -m diffusion_jax.digits_metric --npz=WORKDIR/samples/ema_step_XXXXXXXX_nN.npz [--data_dir=DIR]

Caveat: like any classifier it is over-confident on some non-digits (many pure-noise images get a
confident class), so read confident_fraction together with the histogram and fd.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import pathlib
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow_datasets as tfds
from absl import app, flags, logging
from etils import epath
from flax.traverse_util import flatten_dict, unflatten_dict

from diffusion_jax import fid, input_pipeline
from diffusion_jax.datasets import sklearn_digits

Params = Mapping[str, Any]

DATASET_NAME = sklearn_digits.SklearnDigits.name
IMAGE_SHAPE = (sklearn_digits.IMAGE_SIZE, sklearn_digits.IMAGE_SIZE, 1)
NUM_CLASSES = 10
FEATURE_DIM = 64
VERSION = 'digits-cnn-v2'  # bump on any change to the network, preprocessing or training
# Training recipe; part of the cache key, so changing any value retrains.
TRAIN_HPARAMS = dict(
  seed=0, steps=500, batch_size=128, learning_rate=3e-3, weight_decay=1e-4, max_shift=1
)
CLASSIFIER_SUBDIR = 'sklearn_digits_classifier'
_EVAL_BATCH = 500  # one compiled shape for every call of features_and_probs
FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------------------------- network


class DigitsCNN(nn.Module):
  """Three 3x3 convs (32, 32 at 8x8; 64 at 4x4 after average pooling), a 64-d ReLU layer, 10 logits."""

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = nn.relu(nn.Conv(32, (3, 3), name='conv1')(x))
    x = nn.relu(nn.Conv(32, (3, 3), name='conv2')(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(64, (3, 3), name='conv3')(x))
    # FD features: the penultimate layer before its ReLU (dead ReLU units would make the covariance singular).
    features = nn.Dense(FEATURE_DIM, name='features')(x.reshape(x.shape[0], -1))
    return features, nn.Dense(NUM_CLASSES, name='logits')(nn.relu(features))


_MODEL = DigitsCNN()


def to_model_space(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1] as x / 127.5 - 1 (the diffusion model's space)."""
  return images.astype(jnp.float32) / 127.5 - 1.0


@jax.jit
def _features_and_probs(params: Params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Features (N, 64) and softmax probabilities (N, 10) of uint8 images."""
  features, logits = _MODEL.apply({'params': params}, to_model_space(images))
  return features, jax.nn.softmax(logits)


def _check_images(images: np.ndarray) -> np.ndarray:
  """Returns `images` as a numpy uint8 [N, 8, 8, 1] array or raises a clear error."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise TypeError(
      f'digits_metric expects uint8 images in [0, 255] (as --mode=sample saves them), got '
      f'{images.dtype}; convert [-1, 1] floats with sampling.to_uint8 first.'
    )
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
    raise ValueError(
      f'digits_metric expects images of shape [N, {", ".join(map(str, IMAGE_SHAPE))}], '
      f'got {images.shape}'
    )
  return images


@dataclasses.dataclass(frozen=True)
class DigitsClassifier:
  """A trained digits CNN: params, cache key and its accuracy on the test split."""

  params: Params
  key: str
  test_accuracy: float

  def features_and_probs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 8, 8, 1] -> (features float32 [N, 64], probs float32 [N, 10]), jitted in fixed-size batches."""
    images = _check_images(images)
    features, probs = [], []
    for start in range(0, len(images), _EVAL_BATCH):
      batch = images[start : start + _EVAL_BATCH]
      n = len(batch)
      if n < _EVAL_BATCH:
        batch = np.concatenate([batch, np.zeros((_EVAL_BATCH - n, *IMAGE_SHAPE), np.uint8)])
      f, p = jax.device_get(_features_and_probs(self.params, batch))
      features.append(f[:n])
      probs.append(p[:n])
    if not features:
      return np.zeros((0, FEATURE_DIM), np.float32), np.zeros((0, NUM_CLASSES), np.float32)
    return np.concatenate(features), np.concatenate(probs)

  def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of `images` whose argmax class equals `labels`."""
    return float(np.mean(self.features_and_probs(images)[1].argmax(axis=1) == np.asarray(labels)))


# ------------------------------------------------------------------------------------------------- data


def _check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError unless the config's dataset is sklearn_digits."""
  name = str(config.dataset.name)
  if name.split(':')[0] != DATASET_NAME:
    raise ValueError(
      f'digits_metric only scores {DATASET_NAME!r} (its classifier is trained on it), but '
      f'config.dataset.name is {name!r}; use FID (diffusion_jax.fid) for other datasets.'
    )


def load_split(config: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [N, 8, 8, 1], int labels [N]) of a digits split, in file order (built offline if needed)."""
  _check_config(config)
  builder = input_pipeline.get_builder(config)
  data = builder.as_dataset(
    split=split, batch_size=-1, shuffle_files=False, read_config=input_pipeline._read_config()
  )  # pylint: disable=protected-access
  data = tfds.as_numpy(data)
  return data['image'].astype(np.uint8), data['label'].astype(np.int64)


def default_cache_dir(config: ml_collections.ConfigDict) -> epath.Path:
  """`<data_dir>/sklearn_digits_classifier` (TFDS's default data dir when config.dataset.data_dir is None)."""
  data_dir = config.dataset.data_dir
  if data_dir is None:
    data_dir = input_pipeline.get_builder(config).data_dir_root
  return epath.Path(data_dir) / CLASSIFIER_SUBDIR


# --------------------------------------------------------------------------------------------- training


def classifier_key() -> str:
  """Cache key of the classifier: VERSION plus a digest of the training recipe."""
  digest = hashlib.sha1(json.dumps([VERSION, TRAIN_HPARAMS], sort_keys=True).encode()).hexdigest()[
    :8
  ]
  return f'{VERSION}-{digest}'


def _param_shapes() -> dict[str, tuple[int, ...]]:
  """'/'-joined param name -> shape of the digits CNN."""
  images = jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32)
  abstract = jax.eval_shape(_MODEL.init, jax.random.key(0), images)['params']
  return {name: tuple(leaf.shape) for name, leaf in flatten_dict(abstract, sep='/').items()}


def train_params(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  seed: int = TRAIN_HPARAMS['seed'],
  steps: int = TRAIN_HPARAMS['steps'],
  batch_size: int = TRAIN_HPARAMS['batch_size'],
  learning_rate: float = TRAIN_HPARAMS['learning_rate'],
  weight_decay: float = TRAIN_HPARAMS['weight_decay'],
  max_shift: int = TRAIN_HPARAMS['max_shift'],
) -> Params:
  """Trains the CNN with AdamW (cosine decay), fixed-order minibatches and seeded +-max_shift pixel shifts."""
  images, labels = _check_images(images), np.asarray(labels, np.int32)
  n = len(images)
  rng = np.random.default_rng(seed)
  # Every example once per epoch, in a seeded order; shifts are zero-padded translations.
  order = np.concatenate([rng.permutation(n) for _ in range(-(-steps * batch_size // n))])
  order = order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)
  offsets = rng.integers(0, 2 * max_shift + 1, size=(steps, batch_size, 2)).astype(np.int32)
  padded = jnp.asarray(
    np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  )
  labels = jnp.asarray(labels)
  params = _MODEL.init(jax.random.key(seed), jnp.zeros((1, *IMAGE_SHAPE), jnp.float32))['params']
  tx, step = _optimizer_and_step(steps, learning_rate, weight_decay)
  opt_state = tx.init(params)
  for i in range(steps):
    params, opt_state = step(params, opt_state, padded, labels, order[i], offsets[i])
  return jax.device_get(params)


@functools.lru_cache(maxsize=8)
def _optimizer_and_step(
  steps: int, learning_rate: float, weight_decay: float
) -> tuple[optax.GradientTransformation, Any]:
  """AdamW with cosine decay over `steps` and its jitted train step (cached, so repeated runs compile once)."""
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=weight_decay)

  def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), IMAGE_SHAPE)

  # A jitted step in a Python loop: XLA:CPU runs these convs inside lax.scan ~10x slower.
  @jax.jit
  def step(params, opt_state, padded, labels, index, offset):
    x = to_model_space(jax.vmap(crop)(padded[index], offset))

    def loss_fn(p):
      _, logits = _MODEL.apply({'params': p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels[index]).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return tx, step


def _save_classifier(path: epath.Path, classifier: DigitsClassifier) -> None:
  """Writes params and metadata to .npz atomically (temporary file, then rename)."""
  flat = {
    name: np.asarray(value) for name, value in flatten_dict(classifier.params, sep='/').items()
  }
  buffer = io.BytesIO()
  np.savez(
    buffer,
    __version__=np.asarray(classifier.key),
    __test_accuracy__=np.float64(classifier.test_accuracy),
    **flat,
  )
  _write_atomic(path, buffer.getvalue())


def _write_atomic(path: epath.Path, data: bytes) -> None:
  """Writes bytes to `path` via a temporary sibling, so readers never see a partial file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'.{path.name}.tmp{os.getpid()}'
  tmp.write_bytes(data)
  tmp.replace(path)


def _load_classifier(path: epath.Path) -> DigitsClassifier:
  """Reads a cached classifier; raises (any exception) if it is corrupted or does not match this code."""
  with np.load(io.BytesIO(path.read_bytes())) as f:
    arrays = {name: f[name] for name in f.files}
  key = str(arrays.pop('__version__'))
  if key != classifier_key():
    raise ValueError(f'cache key {key!r} != {classifier_key()!r}')
  accuracy = float(arrays.pop('__test_accuracy__'))
  shapes = {name: value.shape for name, value in arrays.items()}
  if shapes != _param_shapes():
    raise ValueError(f'param names/shapes {shapes} do not match the network')
  if not all(np.isfinite(v).all() for v in arrays.values()):
    raise ValueError('non-finite params')
  params = unflatten_dict(
    {name: value.astype(np.float32) for name, value in arrays.items()}, sep='/'
  )
  return DigitsClassifier(params=params, key=key, test_accuracy=accuracy)


def classifier_path(cache_dir: str | os.PathLike) -> epath.Path:
  """Where the classifier of this code version is cached under `cache_dir`."""
  return epath.Path(cache_dir) / f'classifier_{classifier_key()}.npz'


def load_or_train_classifier(
  config: ml_collections.ConfigDict, *, cache_dir: str | os.PathLike | None = None
) -> DigitsClassifier:
  """Loads the cached classifier or trains it on the train split (and caches it); bad caches are retrained."""
  _check_config(config)
  path = classifier_path(cache_dir if cache_dir is not None else default_cache_dir(config))
  if path.exists():
    try:
      return _load_classifier(path)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning(
        'digits classifier cache %s is unusable (%s: %s); retraining.', path, type(e).__name__, e
      )
  start = time.perf_counter()
  params = train_params(*load_split(config, 'train'))
  classifier = DigitsClassifier(params=params, key=classifier_key(), test_accuracy=0.0)
  accuracy = classifier.accuracy(*load_split(config, 'test'))
  classifier = dataclasses.replace(classifier, test_accuracy=accuracy)
  logging.info(
    'trained the digits classifier in %.1f s: test accuracy %.4f; caching it at %s',
    time.perf_counter() - start,
    accuracy,
    path,
  )
  if accuracy < 0.95:
    logging.warning(
      'digits classifier test accuracy %.4f < 0.95; its metrics are less trustworthy.', accuracy
    )
  _save_classifier(path, classifier)
  return classifier


# ---------------------------------------------------------------------------------------------- metrics


def feature_stats(
  classifier: DigitsClassifier, images: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Float64 mean (64,) and covariance (64, 64) of the images' classifier features."""
  stats = fid.FeatureStats(FEATURE_DIM)
  stats.update(classifier.features_and_probs(images)[0])
  return stats.mean_cov()


def reference_stats(
  config: ml_collections.ConfigDict,
  split: str = 'test',
  *,
  classifier: DigitsClassifier | None = None,
  cache_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """FD reference (mean, cov) of a real split's features; cached as ref_<key>_<split>_n<count>.npz."""
  _check_config(config)
  cache_dir = epath.Path(cache_dir if cache_dir is not None else default_cache_dir(config))
  classifier = classifier or load_or_train_classifier(config, cache_dir=cache_dir)
  count = input_pipeline.get_builder(config).info.splits[split].num_examples
  path = cache_dir / f'ref_{classifier.key}_{re.sub(r"[^A-Za-z0-9]+", "_", split)}_n{count}.npz'
  if path.exists():
    try:
      with np.load(io.BytesIO(path.read_bytes())) as f:  # fid.save_stats's format
        mu, sigma, num = (
          np.asarray(f['mu'], np.float64),
          np.asarray(f['sigma'], np.float64),
          int(f['num_images']),
        )
      if num == count and mu.shape == (FEATURE_DIM,) and sigma.shape == (FEATURE_DIM, FEATURE_DIM):
        return mu, sigma
      raise ValueError(f'shapes {mu.shape}, {sigma.shape} / count {num} do not match')
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('digits reference stats %s are unusable (%s); recomputing.', path, e)
  images, _ = load_split(config, split)
  mu, sigma = feature_stats(classifier, images)
  buffer = io.BytesIO()
  np.savez(
    buffer, mu=mu, sigma=sigma, num_images=np.int64(len(images))
  )  # as fid.save_stats, atomically
  _write_atomic(path, buffer.getvalue())
  return mu, sigma


def digits_metrics(
  classifier: DigitsClassifier,
  images: np.ndarray,
  ref_stats: Sequence[np.ndarray],
  confidence: float = 0.9,
) -> dict[str, Any]:
  """fd (vs ref_stats' (mean, cov)), confident_fraction, class_histogram, min/max_class_fraction, num_images."""
  images = _check_images(images)
  if len(images) < 2:
    raise ValueError(f'digits_metrics needs at least 2 images, got {len(images)}')
  features, probs = classifier.features_and_probs(images)
  stats = fid.FeatureStats(FEATURE_DIM)
  stats.update(features)
  fd = fid.frechet_distance(*stats.mean_cov(), ref_stats[0], ref_stats[1])
  histogram = np.bincount(probs.argmax(axis=1), minlength=NUM_CLASSES) / len(images)
  return {
    'num_images': len(images),
    'fd': fd,
    'confident_fraction': float(np.mean(probs.max(axis=1) > confidence)),
    'class_histogram': [float(h) for h in histogram],
    'min_class_fraction': float(histogram.min()),
    'max_class_fraction': float(histogram.max()),
  }


def real_digits_baseline(
  config: ml_collections.ConfigDict,
  split: str = 'test',
  *,
  ref_split: str = 'train',
  classifier: DigitsClassifier | None = None,
  cache_dir: str | os.PathLike | None = None,
  confidence: float = 0.9,
) -> dict[str, Any]:
  """`digits_metrics` of the real `split` digits against the `ref_split` reference, plus their accuracy."""
  if split == ref_split:
    raise ValueError(
      f'the baseline scores held-out digits: split and ref_split must differ, both are {split!r}'
    )
  classifier = classifier or load_or_train_classifier(config, cache_dir=cache_dir)
  ref = reference_stats(config, ref_split, classifier=classifier, cache_dir=cache_dir)
  images, labels = load_split(config, split)
  metrics = digits_metrics(classifier, images, ref, confidence)
  metrics['accuracy'] = classifier.accuracy(images, labels)
  return metrics


def chunked_fd(
  classifier: DigitsClassifier, images: np.ndarray, ref_stats: Sequence[np.ndarray], chunk: int
) -> float | None:
  """Mean FD over disjoint chunks of `chunk` images (None if fewer): FD at a matched image count."""
  images = _check_images(images)
  if len(images) < chunk:
    return None
  features = classifier.features_and_probs(images)[0]
  fds = []
  for start in range(0, len(images) - chunk + 1, chunk):
    stats = fid.FeatureStats(FEATURE_DIM)
    stats.update(features[start : start + chunk])
    fds.append(fid.frechet_distance(*stats.mean_cov(), ref_stats[0], ref_stats[1]))
  return float(np.mean(fds))


# ------------------------------------------------------------------------------------------ command line


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


def samples_report(
  config: ml_collections.ConfigDict,
  images: np.ndarray,
  *,
  ref_split: str = 'train',
  cache_dir: str | os.PathLike | None = None,
  confidence: float = 0.9,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """(samples' metrics, real-digit baseline) against `ref_split`, each with fd_n<k> at the smaller image count."""
  classifier = load_or_train_classifier(config, cache_dir=cache_dir)
  ref = reference_stats(config, ref_split, classifier=classifier, cache_dir=cache_dir)
  metrics = digits_metrics(classifier, images, ref, confidence)
  baseline_split = 'test' if ref_split != 'test' else 'train'
  baseline = real_digits_baseline(
    config,
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
    baseline[f'fd_n{n}'] = chunked_fd(classifier, load_split(config, baseline_split)[0], ref, n)
  return metrics, baseline


def _main(argv: list[str]) -> None:
  """Prints the digits metrics of an .npz of samples next to the real-digit baseline."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  if FLAGS.data_dir is not None:
    config.dataset.data_dir = FLAGS.data_dir
  with np.load(io.BytesIO(epath.Path(FLAGS.npz).read_bytes())) as data:
    if 'images' not in data.files:
      raise SystemExit(f'error: {FLAGS.npz} has no `images` array (it has {data.files})')
    images = np.asarray(data['images'])
    step = int(data['step']) if 'step' in data.files else None
  metrics, baseline = samples_report(
    config,
    images,
    ref_split=FLAGS.ref_split,
    cache_dir=FLAGS.cache_dir,
    confidence=FLAGS.confidence,
  )
  if FLAGS.json:
    print(
      json.dumps(
        {
          'npz': FLAGS.npz,
          'step': step,
          'ref_split': FLAGS.ref_split,
          'samples': metrics,
          'baseline': baseline,
        }
      )
    )
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


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], 'GPU')
  flags.DEFINE_string(
    'npz', None, 'An .npz with `images` uint8 [N, 8, 8, 1] (as --mode=sample writes).'
  )
  config_flags.DEFINE_config_file(
    'config',
    str(pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'digits.py'),
    'The training config (its dataset.data_dir holds the digits and the classifier cache).',
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
  app.run(_main)
