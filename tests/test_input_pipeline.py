"""Input pipeline: the offline digits builder, per-process shares, resumable train order, flips,
missing-data errors and padded eval batches (simulated hosts, tmp data dirs, no network)."""

import collections
import pathlib
import time

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets
from sklearn import model_selection

from diffusion_jax import config_defaults, input_pipeline
from diffusion_jax.errors import SetupError

from conftest import load_config

NUM_TRAIN, NUM_TEST = 1497, 300


@pytest.fixture(scope='session')
def digits_dir(data_dir):
  return pathlib.Path(data_dir)


@pytest.fixture
def dataset(data_dir) -> ml_collections.ConfigDict:
  """The dataset section of configs/digits.py (batch 64) on the session's data dir."""
  return load_config('digits.py', data_dir).dataset


def train_iterator(dataset, *, batch_size=64, steps_per_call=1, **kwargs):
  """The digits train iterator of configs/digits.py's seed."""
  builder = input_pipeline.get_builder(dataset)
  return input_pipeline.create_train_iterator(
    builder, dataset, batch_size=batch_size, steps_per_call=steps_per_call, seed=0, **kwargs
  )


def eval_dataset(dataset, split, **kwargs):
  return input_pipeline.create_eval_dataset(
    input_pipeline.get_builder(dataset), dataset, split, **kwargs
  )


def keys(images: np.ndarray) -> list[bytes]:
  """Identifies [-1, 1] images by their bytes on the uint8 grid."""
  return [np.round((x + 1.0) * 127.5).astype(np.uint8).tobytes() for x in images]


def take(iterator, n: int) -> list[np.ndarray]:
  """The next ``n`` [steps_per_call, B, ...] elements' images."""
  return [next(iterator)['image'] for _ in range(n)]


def test_digits_builder_matches_sklearn(digits_dir):
  builder = tfds.builder('sklearn_digits', data_dir=str(digits_dir))
  assert builder.is_prepared() and str(builder.version) == '2.0.0'
  digits = sk_datasets.load_digits()
  indices = dict(
    zip(
      ('train', 'test'),
      model_selection.train_test_split(
        np.arange(len(digits.target)), test_size=NUM_TEST, stratify=digits.target, random_state=0
      ),
    )
  )
  for split, size in (('train', NUM_TRAIN), ('test', NUM_TEST)):
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    images, labels = data['image'], data['label']
    assert images.shape == (size, 8, 8, 1) and images.dtype == np.uint8
    assert set(labels) == set(range(10))
    assert images.min() == 0 and images.max() == 255  # 0..16 spans the full uint8 range
    # The split is exactly its sklearn digits at native 8x8 with values round(v * 255 / 16), each
    # with its label (compared as multisets: TFDS stores examples in its own order).
    expected = np.round(digits.images[indices[split]] * 255 / 16).astype(np.uint8)
    want = collections.Counter(zip((x.tobytes() for x in expected), digits.target[indices[split]]))
    got = collections.Counter(zip((x[..., 0].tobytes() for x in images), labels))
    assert got == want


@pytest.mark.parametrize('process_count', [1, 2, 3, 4])
def test_process_shares_partition_the_split(digits_dir, process_count):
  builder = tfds.builder('sklearn_digits', data_dir=str(digits_dir))
  read_config = tfds.ReadConfig(add_tfds_id=True)

  def ids(split):
    ds = builder.as_dataset(
      split=split,
      batch_size=-1,
      read_config=read_config,
      decoders={'image': tfds.decode.SkipDecoding()},
    )
    return list(tfds.as_numpy(ds)['tfds_id'])

  shares = [
    ids(input_pipeline.process_split('train', i, process_count)) for i in range(process_count)
  ]
  assert max(map(len, shares)) - min(map(len, shares)) <= 1
  assert sorted(sum(shares, [])) == sorted(ids('train'))  # disjoint and covering
  assert len(set(sum(shares, []))) == NUM_TRAIN


def test_train_epoch_is_the_process_share(dataset):
  dataset.random_flip = False
  for index in range(2):
    share, _ = eval_dataset(dataset, 'train', batch_size=64, process_index=index, process_count=2)
    share_keys = [k for b in share for k, m in zip(keys(b['image']), b['mask']) if m]
    batches = take(
      train_iterator(dataset, process_index=index, process_count=2), len(share_keys) // 32 + 1
    )
    assert all(b.shape == (1, 32, 8, 8, 1) and b.dtype == np.float32 for b in batches)
    epoch = keys(np.concatenate(batches, axis=1)[0])[: len(share_keys)]
    assert collections.Counter(epoch) == collections.Counter(share_keys)


@pytest.mark.parametrize(
  'process_index,process_count,steps_per_call,starts',
  [
    (0, 1, 1, (5, 23, 24)),  # batch 23 straddles the 1497-example epoch boundary
    (1, 2, 2, (3, 11, 12, 23, 24)),  # 64 examples per call over 748: calls 11 and 23 straddle
  ],
)
def test_resumed_iterator_continues_the_uninterrupted_one(
  dataset, process_index, process_count, steps_per_call, starts
):
  def make(start):
    return train_iterator(
      dataset,
      steps_per_call=steps_per_call,
      start_step=start,
      process_index=process_index,
      process_count=process_count,
    )

  reference = take(make(0), max(starts) + 3)
  assert reference[0].shape == (steps_per_call, 64 // process_count, 8, 8, 1)
  for start in starts:
    for want, got in zip(reference[start:], take(make(start), 3)):
      np.testing.assert_array_equal(got, want)


def test_batches_are_scaled_to_unit_interval(dataset):
  batch = next(train_iterator(dataset, process_index=2, process_count=4))['image']
  assert batch.dtype == np.float32 and batch.shape == (1, 16, 8, 8, 1)
  assert batch.min() == -1.0 and batch.max() == 1.0
  grid = (batch + 1.0) * 127.5
  np.testing.assert_allclose(grid, np.round(grid), atol=1e-4)  # x / 127.5 - 1 of uint8 x


def test_indivisible_global_batch_is_a_clear_error(dataset):
  with pytest.raises(
    ValueError, match='global batch size 64 is not divisible by the number of processes 3'
  ):
    train_iterator(dataset, process_index=0, process_count=3)


@pytest.mark.parametrize('random_flip', [False, True])
def test_flips_only_when_configured(dataset, random_flip):
  dataset.random_flip = random_flip
  eval_batches, _ = eval_dataset(dataset, 'train', batch_size=64)
  originals = {k for b in eval_batches for k in keys(b['image'])}
  mirrors = {k for b in eval_batches for k in keys(b['image'][:, :, ::-1])}
  images = np.concatenate(take(train_iterator(dataset), 2 * NUM_TRAIN // 64), axis=1)[0]
  flipped = [k not in originals for k in keys(images)]
  assert all(k in originals or k in mirrors for k in keys(images))
  if random_flip:
    assert 0.35 < np.mean(flipped) < 0.65  # about half (mirror-symmetric digits count as kept)
  else:
    assert not any(flipped)


def test_missing_dataset_raises_with_prepare_command(tmp_path):
  dataset = config_defaults.get_config().dataset
  dataset.name, dataset.data_dir, dataset.download = 'cifar10', str(tmp_path), False
  start = time.monotonic()
  with pytest.raises(input_pipeline.DatasetNotPreparedError) as error:
    input_pipeline.get_builder(dataset)
  assert time.monotonic() - start < 10
  command = (
    f"python -c \"import tensorflow_datasets as tfds; tfds.builder('cifar10', "
    f"data_dir='{tmp_path}').download_and_prepare()\""
  )
  assert command in str(error.value)
  assert '--config.dataset.download=True' in str(error.value)


@pytest.mark.parametrize(
  'name,needles',
  [
    ('lsun_lmdb/bedroom', ('diffusion_jax.datasets.prepare --dataset=lsun_lmdb/bedroom',)),
    ('lsun/bedroom', ('tensorflow-io', '--config.dataset.name=lsun_lmdb/bedroom')),
    ('celeb_a_hq/256', ('data256x256.tar', 'docs/datasets.md')),
  ],
)
def test_manual_datasets_explain_the_manual_steps(tmp_path, name, needles):
  dataset = config_defaults.get_config().dataset
  dataset.name, dataset.data_dir = name, str(tmp_path)
  with pytest.raises(input_pipeline.DatasetNotPreparedError) as error:
    input_pipeline.get_builder(dataset)
  assert all(needle in str(error.value) for needle in (str(tmp_path),) + needles)


@pytest.mark.parametrize('process_count', [1, 2, 3, 4])
def test_eval_dataset_covers_the_split_once_with_equal_batch_counts(
  digits_dir, dataset, process_count
):
  builder = tfds.builder('sklearn_digits', data_dir=str(digits_dir))
  images = tfds.as_numpy(builder.as_dataset(split='train', batch_size=-1))['image']
  real, counts = [], set()
  for index in range(process_count):
    batches, num_batches = eval_dataset(
      dataset, 'train', batch_size=24, process_index=index, process_count=process_count
    )
    batches = list(batches)
    counts.add((num_batches, len(batches)))
    for batch in batches:
      assert batch['image'].shape == (24 // process_count, 8, 8, 1)
      assert set(batch['mask']) <= {0.0, 1.0} and batch['mask'].dtype == np.float32
      real += keys(batch['image'][batch['mask'] == 1])
      assert not batch['image'][batch['mask'] == 0].any()
  assert len(counts) == 1 and counts.pop()[0] == -(-NUM_TRAIN // 24)
  assert collections.Counter(real) == collections.Counter(keys(images / 127.5 - 1.0))


def test_preprocess_center_crops_resizes_and_keeps_the_uint8_grid():
  dataset = config_defaults.get_config().dataset
  dataset.image_size, dataset.center_crop = 32, True
  image = np.zeros((40, 60, 3), np.uint8)
  image[:, 10:50] = 200  # the centered 40x40 square; the 10-pixel bands at the sides are cropped
  out = input_pipeline.preprocess(tf.constant(image), dataset).numpy()
  assert out.shape == (32, 32, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, 200 / 127.5 - 1.0, rtol=1e-6)
  ramp = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64, 1)
  gray = input_pipeline.preprocess(tf.constant(ramp), dataset).numpy()
  assert gray.shape == (32, 32, 1) and -1.0 <= gray.min() <= gray.max() <= 1.0
  np.testing.assert_allclose((gray + 1) * 127.5, np.round((gray + 1) * 127.5), atol=1e-4)


def test_labels_come_with_their_images_and_leave_the_image_stream_as_it_was(dataset):
  """A class-conditional run reads the labels; the images (order, flips) are the unconditional
  run's, so a label-free config trains on exactly what it did before."""
  plain = take(train_iterator(dataset, steps_per_call=2), 3)
  labelled = train_iterator(dataset, steps_per_call=2, label_key='label')
  builder = input_pipeline.get_builder(dataset)
  images, labels = sklearn_digits_arrays(builder)
  truth = dict(zip(keys(images), labels))
  for expected in plain:
    batch = next(labelled)
    np.testing.assert_array_equal(batch['image'], expected)
    assert batch['label'].shape == (2, 64) and batch['label'].dtype == np.int32
    assert [truth[k] for k in keys(batch['image'].reshape(-1, 8, 8, 1))] == list(
      batch['label'].ravel()
    )


def sklearn_digits_arrays(builder):
  """Every train image in [-1, 1] and its class, read by TFDS."""
  examples = list(tfds.as_numpy(builder.as_dataset(split='train')))
  images = np.stack([e['image'] for e in examples]).astype(np.float32) / 127.5 - 1.0
  return images, [int(e['label']) for e in examples]


def test_a_data_set_without_the_class_feature_is_named(dataset):
  builder = input_pipeline.get_builder(dataset)
  input_pipeline.check_labels(builder, 'label', 10)
  with pytest.raises(SetupError, match="no class feature 'digit'"):
    input_pipeline.check_labels(builder, 'digit', 10)
  with pytest.raises(SetupError, match='has 10 classes; set --config.model.num_classes=10'):
    input_pipeline.check_labels(builder, 'label', 7)
