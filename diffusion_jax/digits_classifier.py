"""The digits metric's classifier: a small CNN, its deterministic training on the ``sklearn_digits``
TRAIN split (~15-30 s on 2 CPU cores), and its ``.npz`` cache keyed by the code version.

Functions take the prepared TFDS builder (``input_pipeline.get_builder(config.dataset)``) and
refuse any other data set. Images are uint8 [N, 8, 8, 1] (what ``--mode=sample`` saves); the
network sees x / 127.5 - 1 like the diffusion model. ``digits_metric`` scores samples with it and
re-exports the names its users need.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from flax.traverse_util import flatten_dict, unflatten_dict

from diffusion_jax import images as images_lib
from diffusion_jax import input_pipeline, npz
from diffusion_jax.datasets import sklearn_digits
from diffusion_jax.errors import SetupError

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


# ----------------------------------------------------------------------------- network


class DigitsCNN(nn.Module):
  """Three 3x3 convs (32, 32 at 8x8; 64 at 4x4 after average pooling), a 64-d ReLU layer, 10
  logits."""

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = nn.relu(nn.Conv(32, (3, 3), name='conv1')(x))
    x = nn.relu(nn.Conv(32, (3, 3), name='conv2')(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(64, (3, 3), name='conv3')(x))
    # FD features: the penultimate layer before its ReLU (dead ReLU units would make the
    # covariance singular).
    features = nn.Dense(FEATURE_DIM, name='features')(x.reshape(x.shape[0], -1))
    return features, nn.Dense(NUM_CLASSES, name='logits')(nn.relu(features))


_MODEL = DigitsCNN()


def to_model_space(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1] as x / 127.5 - 1 (the diffusion model's space)."""
  return images_lib.from_pixels(images.astype(jnp.float32))


@jax.jit
def _features_and_probs(params: Params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Features (N, 64) and softmax probabilities (N, 10) of uint8 images."""
  features, logits = _MODEL.apply({'params': params}, to_model_space(images))
  return features, jax.nn.softmax(logits)


def check_images(images: np.ndarray) -> np.ndarray:
  """``images`` as a numpy uint8 [N, 8, 8, 1] array, or a clear error."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise TypeError(
      f'digits_metric expects uint8 images in [0, 255] (as --mode=sample saves them), got '
      f'{images.dtype}; convert [-1, 1] floats with images.to_uint8 first.'
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
    """uint8 [N, 8, 8, 1] -> (features float32 [N, 64], probs float32 [N, 10]), jitted in
    fixed-size batches."""
    images = check_images(images)
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
    """Fraction of ``images`` whose argmax class equals ``labels``."""
    return float(np.mean(self.features_and_probs(images)[1].argmax(axis=1) == np.asarray(labels)))


# ----------------------------------------------------------------------------- data


def check_builder(builder: tfds.core.DatasetBuilder) -> None:
  """A SetupError unless ``builder`` is sklearn_digits'."""
  if builder.name != DATASET_NAME:
    raise SetupError(
      f'digits_metric only scores {DATASET_NAME!r} (its classifier is trained on it), but the '
      f'data set is {builder.name!r}; use FID (diffusion_jax.fid) for other data sets.'
    )


def load_split(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [N, 8, 8, 1], int labels [N]) of a digits split, in file order."""
  check_builder(builder)
  data = builder.as_dataset(
    split=split, batch_size=-1, shuffle_files=False, read_config=input_pipeline.read_config()
  )
  data = tfds.as_numpy(data)
  return data['image'].astype(np.uint8), data['label'].astype(np.int64)


def default_cache_dir(builder: tfds.core.DatasetBuilder) -> epath.Path:
  """``<the builder's data dir>/sklearn_digits_classifier``."""
  return epath.Path(builder.data_dir_root) / CLASSIFIER_SUBDIR


# ----------------------------------------------------------------------------- training


def classifier_key() -> str:
  """Cache key of the classifier: VERSION plus a digest of the training recipe."""
  recipe = json.dumps([VERSION, TRAIN_HPARAMS], sort_keys=True).encode()
  return f'{VERSION}-{hashlib.sha1(recipe).hexdigest()[:8]}'


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
  """Trains the CNN with AdamW (cosine decay), fixed-order minibatches and seeded
  +-``max_shift`` pixel shifts."""
  images, labels = check_images(images), np.asarray(labels, np.int32)
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
  """AdamW with cosine decay over ``steps`` and its jitted train step (cached, so repeated runs
  compile once)."""
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


# ----------------------------------------------------------------------------- cache


def save_classifier(path: epath.PathLike, classifier: DigitsClassifier) -> None:
  """Writes params and metadata to ``.npz`` atomically."""
  npz.write(
    path,
    {
      '__version__': np.asarray(classifier.key),
      '__test_accuracy__': np.float64(classifier.test_accuracy),
      **{name: np.asarray(v) for name, v in flatten_dict(classifier.params, sep='/').items()},
    },
  )


def load_classifier(path: epath.PathLike) -> DigitsClassifier:
  """Reads a cached classifier; raises (any exception) if it is corrupted or does not match this
  code."""
  arrays = npz.read(path)
  key = str(arrays.pop('__version__'))
  if key != classifier_key():
    raise ValueError(f'cache key {key!r} != {classifier_key()!r}')
  accuracy = float(arrays.pop('__test_accuracy__'))
  shapes = {name: value.shape for name, value in arrays.items()}
  if shapes != _param_shapes():
    raise ValueError(f'param names/shapes {shapes} do not match the network')
  if not all(np.isfinite(v).all() for v in arrays.values()):
    raise ValueError('non-finite params')
  params = unflatten_dict({name: v.astype(np.float32) for name, v in arrays.items()}, sep='/')
  return DigitsClassifier(params=params, key=key, test_accuracy=accuracy)


def classifier_path(cache_dir: epath.PathLike) -> epath.Path:
  """Where the classifier of this code version is cached under ``cache_dir``."""
  return epath.Path(cache_dir) / f'classifier_{classifier_key()}.npz'


def load_or_train_classifier(
  builder: tfds.core.DatasetBuilder, *, cache_dir: epath.PathLike | None = None
) -> DigitsClassifier:
  """The cached classifier, or one trained on the train split (then cached); unusable caches
  are retrained. ``cache_dir`` defaults to ``default_cache_dir(builder)``."""
  check_builder(builder)
  path = classifier_path(cache_dir if cache_dir is not None else default_cache_dir(builder))
  if path.exists():
    try:
      return load_classifier(path)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning(
        'digits classifier cache %s is unusable (%s: %s); retraining.', path, type(e).__name__, e
      )
  start = time.perf_counter()
  params = train_params(*load_split(builder, 'train'))
  classifier = DigitsClassifier(params=params, key=classifier_key(), test_accuracy=0.0)
  accuracy = classifier.accuracy(*load_split(builder, 'test'))
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
  save_classifier(path, classifier)
  return classifier
