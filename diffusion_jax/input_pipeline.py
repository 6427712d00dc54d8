"""Deterministic, resumable, per-process TFDS input pipelines for DDPM training and evaluation.

Images are decoded, optionally center-cropped to a square, resized to ``image_size``, randomly
flipped (train only) and scaled from uint8 [0, 255] to float32 [-1, 1] as x / 127.5 - 1.
Each process reads its own share of a split (``tfds.split_for_jax_process``) and yields numpy
batches of its share of the global batch size.
"""

from collections.abc import Iterable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from diffusion_jax import console, images, rngs, runtime
from diffusion_jax.datasets import prepare, sklearn_digits
from diffusion_jax.errors import SetupError

Batch = dict[str, np.ndarray]


class DatasetNotPreparedError(SetupError):
  """The TFDS dataset is not prepared in the configured data dir."""


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """Fills in this JAX process's index and the process count where not given."""
  return (
    jax.process_index() if process_index is None else process_index,
    jax.process_count() if process_count is None else process_count,
  )


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """Returns the per-process batch size; the global batch must split evenly over processes."""
  if global_batch_size % process_count:
    raise ValueError(
      f'The global batch size {global_batch_size} is not divisible by the '
      f'number of processes {process_count}.'
    )
  return global_batch_size // process_count


def process_split(split: str, process_index: int, process_count: int) -> tfds.typing.SplitArg:
  """This process's share of ``split``: contiguous, disjoint, sizes differing by at most 1."""
  return tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)


def first_examples(split: str, num_examples: int | None) -> str:
  """``split`` cut to its first ``num_examples`` examples (all of it if None), as TFDS reads it."""
  return split if num_examples is None else f'{split}[:{num_examples}]'


def check_splits(builder: tfds.core.DatasetBuilder, splits: dict[str, str | None]) -> None:
  """A SetupError naming the config field if a split (``'train'``, ``'test[:16]'``; None: not
  used) is not one of the prepared data set's, before any sampling or training starts."""
  available = sorted(builder.info.splits)
  for field, split in splits.items():
    if split is None:
      continue
    try:
      builder.info.splits[split]
    except (KeyError, ValueError):
      raise SetupError(
        f'{field}={split!r} is not a split of {builder.info.full_name}, which has {available}; '
        f'set --config.{field} to one of them (a slice such as "train[:1000]" works too).'
      ) from None


def get_builder(dataset_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared builder of ``config.dataset``: builds ``sklearn_digits`` offline, downloads if
  ``download`` allows, else raises DatasetNotPreparedError with the command that prepares it.

  With several processes, process 0 prepares first and the others wait, so that hosts sharing a
  data dir never write it at once (hosts with data dirs of their own then prepare their own).
  """
  if runtime.is_coordinator():
    builder = _prepared_builder(dataset_config)
  runtime.barrier(f'process 0 prepared {dataset_config.name}')
  if not runtime.is_coordinator():
    builder = _prepared_builder(dataset_config)
  return builder


def _prepared_builder(dataset_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The builder of ``config.dataset``, prepared here if it is not yet and may be."""
  builder = tfds.builder(dataset_config.name, data_dir=dataset_config.data_dir)
  if builder.is_prepared():
    return builder
  if builder.name == sklearn_digits.SklearnDigits.name:
    console.say('Building %s in %s (offline, once).', builder.name, builder.data_dir_root)
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
  elif dataset_config.download:
    builder.download_and_prepare()
  if not builder.is_prepared():
    raise DatasetNotPreparedError(prepare.instructions(builder))
  return builder


def read_config(shuffle_seed: int | None = None) -> tfds.ReadConfig:
  """Returns a TFDS read config with deterministic order (a fixed file order when shuffling)."""
  options = tf.data.Options()
  options.deterministic = True
  return tfds.ReadConfig(
    options=options, shuffle_seed=shuffle_seed, shuffle_reshuffle_each_iteration=False
  )


def _encoded_examples(
  builder: tfds.core.DatasetBuilder,
  split: tfds.typing.SplitArg,
  *,
  label_key: str | None = None,
  shuffle_seed: int | None = None,
) -> tf.data.Dataset:
  """``{'image': still-encoded bytes[, 'label': the class]}`` of ``split`` (files shuffled once if
  a seed is given); the class is the feature ``label_key``, if given."""
  ds = builder.as_dataset(
    split=split,
    shuffle_files=shuffle_seed is not None,
    decoders={'image': tfds.decode.SkipDecoding()},
    read_config=read_config(shuffle_seed),
  )

  def keep(example):
    kept = {'image': example['image']}
    if label_key is not None:
      kept['label'] = tf.cast(example[label_key], tf.int32)
    return kept

  return ds.map(keep)


def label_key(dataset_config: ml_collections.ConfigDict, num_classes: int | None) -> str | None:
  """The feature of the class labels a class-conditional model (``num_classes``) reads."""
  return None if num_classes is None else dataset_config.label_key


def check_labels(
  builder: tfds.core.DatasetBuilder, key: str | None, num_classes: int | None
) -> None:
  """A SetupError unless the data set has the class feature ``key`` with ``num_classes``
  classes (nothing to check for an unconditional model, ``key`` None)."""
  if key is None:
    return
  features = builder.info.features
  feature = features[key] if key in features else None
  found = getattr(feature, 'num_classes', None)
  if found is None:
    raise SetupError(
      f'model.num_classes={num_classes} asks for class labels, but {builder.info.full_name} has '
      f'no class feature {key!r} (its features: {", ".join(builder.info.features)}); set '
      '--config.dataset.label_key, or train an unconditional model (model.num_classes=None).'
    )
  if found != num_classes:
    raise SetupError(
      f"model.num_classes={num_classes}, but {builder.info.full_name}'s {key!r} has {found} "
      f'classes; set --config.model.num_classes={found}.'
    )


def _image_decoder(builder: tfds.core.DatasetBuilder, num_channels: int):
  """The image feature's decoder, after checking its channels against ``num_channels``."""
  feature = builder.info.features['image']
  if feature.shape[-1] != num_channels:
    raise ValueError(
      f'{builder.name} images have {feature.shape[-1]} channels but '
      f'config.dataset.num_channels is {num_channels}.'
    )
  return feature.decode_example


def center_crop(image: tf.Tensor) -> tf.Tensor:
  """Crops the largest centered square out of an HWC image."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  size = tf.minimum(height, width)
  return tf.image.crop_to_bounding_box(image, (height - size) // 2, (width - size) // 2, size, size)


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Resizes to image_size x image_size (antialiased bilinear), rounded to the 0..255 grid."""
  if tuple(image.shape[:2]) == (image_size, image_size):
    return tf.cast(image, tf.float32)
  image = tf.image.resize(image, (image_size, image_size), method='bilinear', antialias=True)
  return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def preprocess(image: tf.Tensor, dataset_config: ml_collections.ConfigDict) -> tf.Tensor:
  """A decoded uint8 HWC image -> float32 [image_size, image_size, C] in [-1, 1]."""
  if dataset_config.center_crop:
    image = center_crop(image)
  return images.from_pixels(resize(image, dataset_config.image_size))


def _shuffled_epochs(
  encoded: tf.data.Dataset,
  num_examples: int,
  *,
  seed: np.ndarray,
  start_epoch: int,
  skip: int,
  buffer_size: int,
) -> tf.data.Dataset:
  """Infinite (flip seed, encoded example) epochs from ``start_epoch``, skipping the first
  ``skip``.

  Epoch e is ``encoded`` shuffled with a seed folded from (seed, e), so its order does not depend on
  where iteration started; each element's flip seed is folded from (epoch seed, index in epoch).
  """
  buffer_size = min(buffer_size, num_examples)

  def epoch(index: tf.Tensor) -> tf.data.Dataset:
    epoch_seed = tf.random.experimental.stateless_fold_in(seed, index)
    ds = encoded.shuffle(buffer_size, seed=epoch_seed[0], reshuffle_each_iteration=False)
    ds = ds.enumerate().skip(tf.where(index == start_epoch, tf.constant(skip, tf.int64), 0))
    return ds.map(
      lambda i, example: (tf.random.experimental.stateless_fold_in(epoch_seed, i), example)
    )

  return tf.data.Dataset.counter(start_epoch).flat_map(epoch)


def create_train_iterator(
  builder: tfds.core.DatasetBuilder,
  dataset_config: ml_collections.ConfigDict,
  *,
  batch_size: int,
  steps_per_call: int,
  seed: int,
  start_step: int = 0,
  label_key: str | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[Batch]:
  """This process's infinite, deterministic, resumable iterator of train batches.

  Yields ``{'image': float32 [steps_per_call, B, H, W, C]}`` (and ``'label'``: int32
  [steps_per_call, B], the feature ``label_key``, if given), B = batch_size // process_count
  (``batch_size`` is global). A "step" here is one yielded element, i.e. one host call of
  ``steps_per_call`` optimizer steps, so resume with
  ``start_step = optimizer_step // steps_per_call``.
  Contract: for the same builder, dataset config, seed, batch size, steps_per_call and process
  index/count, the iterator built with ``start_step=s`` yields exactly the batches the
  ``start_step=0`` iterator yields from its s-th element (0-based) on.

  The process's share is read as an endless stream of epochs; epoch e is the share shuffled with a
  seed derived from (seed, process, e) and flips are seeded by (that seed, index in epoch), so
  batches do not depend on the start. Resuming skips the first
  start_step * steps_per_call * B elements of that stream: whole epochs by arithmetic, then the
  rest of the start epoch on still-encoded records (no decoding). Files are shuffled once per
  process (a fixed order across epochs); shuffling within an epoch is exact if the share fits in
  ``shuffle_buffer_size`` and a sliding-window shuffle otherwise. The order changes if the process
  count changes.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = local_batch_size(batch_size, process_count)
  split = process_split(dataset_config.train_split, process_index, process_count)
  num_examples = builder.info.splits[split].num_examples
  start_epoch, skip = divmod(start_step * steps_per_call * local_batch, num_examples)
  process_seed = rngs.data_seed(seed, process_index)
  decode = _image_decoder(builder, dataset_config.num_channels)

  def to_example(flip_seed: tf.Tensor, encoded: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = preprocess(decode(encoded['image']), dataset_config)
    if dataset_config.random_flip:
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return {**encoded, 'image': image}

  encoded = _encoded_examples(
    builder, split, label_key=label_key, shuffle_seed=int(process_seed[0])
  )
  ds = _shuffled_epochs(
    encoded,
    num_examples,
    seed=process_seed,
    start_epoch=start_epoch,
    skip=skip,
    buffer_size=dataset_config.shuffle_buffer_size,
  )
  ds = ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True).batch(steps_per_call, drop_remainder=True)
  ds = ds.prefetch(dataset_config.prefetch)
  return iter(tfds.as_numpy(ds))


def _padding(element_spec: dict[str, tf.TensorSpec], count: int) -> tf.data.Dataset:
  """Returns ``count`` all-zero elements of ``element_spec`` (so with mask 0)."""
  zeros = {key: tf.zeros(spec.shape, spec.dtype) for key, spec in element_spec.items()}
  return tf.data.Dataset.from_tensors(zeros).repeat(count)


def create_eval_dataset(
  builder: tfds.core.DatasetBuilder,
  dataset_config: ml_collections.ConfigDict,
  split: str,
  *,
  batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> tuple[Iterable[Batch], int]:
  """(Re-iterable batches of one pass over this process's share of ``split``, num_batches).

  ``batch_size`` is global; each process gets batch_size // process_count rows per batch as
  ``{'image': float32 [B, H, W, C], 'mask': float32 [B]}``, in file order, without flips. Every
  example of the split is in exactly one process's share with mask 1; shares are padded with
  all-zero rows of mask 0 up to ceil(largest share / B) batches, so ``num_batches`` is the same on
  every process and all hosts run the same number of (collective) eval steps.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = local_batch_size(batch_size, process_count)
  shares = [
    builder.info.splits[process_split(split, i, process_count)].num_examples
    for i in range(process_count)
  ]
  num_batches = -(-max(shares) // local_batch)
  decode = _image_decoder(builder, dataset_config.num_channels)

  def to_example(encoded: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = preprocess(decode(encoded['image']), dataset_config)
    return {'image': image, 'mask': tf.constant(1.0)}

  ds = _encoded_examples(builder, process_split(split, process_index, process_count))
  ds = ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.concatenate(_padding(ds.element_spec, num_batches * local_batch - shares[process_index]))
  ds = ds.batch(local_batch).prefetch(dataset_config.prefetch)
  return tfds.as_numpy(ds), num_batches
