"""``lsun_lmdb`` and ``python -m diffusion_jax.datasets.prepare``: a tiny LMDB export written with
the ``lmdb`` package into a tmp manual dir, prepared offline, read back exactly and through the
input pipeline; the missing-files error; CelebA-HQ packed from progressive_growing_of_gans
tfrecords (no network)."""

import hashlib
import io
import os
import pathlib
import shutil
import subprocess
import sys

import lmdb
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image, features

from diffusion_jax import config_defaults, input_pipeline
from diffusion_jax.datasets import lsun_lmdb, prepare

from conftest import REPO

CATEGORY = 'bedroom'
NUM_TRAIN_JPEG, NUM_VAL = 24, 6
WEBP = features.check('webp')


def _image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A smooth RGB test image (gradients and a disc), so lossy codecs keep it close."""
  y, x = np.mgrid[:height, :width]
  disc = (y - height * rng.uniform(0.3, 0.7)) ** 2 + (x - width * rng.uniform(0.3, 0.7)) ** 2
  channels = [
    255 * y / height,
    255 * x / width,
    np.where(disc < (min(height, width) / 3) ** 2, 220.0, 40.0),
  ]
  return np.clip(np.stack(channels, -1) * rng.uniform(0.6, 1.0), 0, 255).astype(np.uint8)


def _encode(image: np.ndarray, fmt: str) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=fmt, quality=90)
  return buffer.getvalue()


def _key(index: int) -> str:
  """An id like LSUN's (40 hex digits)."""
  return hashlib.sha1(str(index).encode()).hexdigest()


def _write_lmdb(path: pathlib.Path, records: dict[str, bytes]) -> None:
  env = lmdb.open(str(path), map_size=1 << 26)
  with env.begin(write=True) as txn:
    for key, value in records.items():
      txn.put(key.encode(), value)
  env.close()


@pytest.fixture(scope='module')
def source(tmp_path_factory) -> dict:
  """``{'manual': dir with bedroom_{train,val}_lmdb/, 'zips': dir with their zips, 'train':
  {id: (bytes, kind)}, 'validation': ..., 'broken': id}``; the train set has JPEGs of
  different sizes, a grayscale JPEG, a WebP (if PIL writes WebP) and a truncated JPEG."""
  root = tmp_path_factory.mktemp('lsun')
  rng = np.random.default_rng(0)
  sets = {'train': {}, 'validation': {}}
  for index in range(NUM_TRAIN_JPEG + NUM_VAL):
    image = _image(rng, int(rng.integers(24, 64)), int(rng.integers(24, 64)))
    split = 'train' if index < NUM_TRAIN_JPEG else 'validation'
    sets[split][_key(index)] = (_encode(image, 'JPEG'), 'jpeg')
  sets['train'][_key(100)] = (_encode(_image(rng, 40, 30)[..., 0], 'JPEG'), 'jpeg')  # grayscale
  if WEBP:
    sets['train'][_key(101)] = (_encode(_image(rng, 36, 48), 'WEBP'), 'webp')
  broken = _key(102)
  records = {key: value[0] for key, value in sets['train'].items()}
  records[broken] = _encode(_image(rng, 50, 50), 'JPEG')[:200]
  manual, zips = root / 'manual', root / 'zips'
  for folder in (manual, zips):
    folder.mkdir()
  for release_split, split_records in (
    ('train', records),
    ('val', {key: value[0] for key, value in sets['validation'].items()}),
  ):
    name = lsun_lmdb.lmdb_name(CATEGORY, release_split)
    _write_lmdb(manual / name, split_records)
    shutil.make_archive(str(zips / name), 'zip', root_dir=manual, base_dir=name)
  return {'manual': manual, 'zips': zips, 'broken': broken, **sets}


def _read_split(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, tuple[bytes, object]]:
  """{id: (stored bytes, TF-decoded pixels)} of a prepared split."""
  ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  decode = builder.info.features['image'].decode_example
  return {
    example['id'].numpy().decode(): (example['image'].numpy(), decode(example['image']).numpy())
    for example in ds
  }


def _check_prepared(builder: tfds.core.DatasetBuilder, source: dict) -> None:
  """Splits, counts, ids, stored bytes and pixels against the source records."""
  assert set(builder.info.splits) == {'train', 'validation'}
  for split in ('train', 'validation'):
    expected = source[split]
    assert builder.info.splits[split].num_examples == len(expected)
    stored = _read_split(builder, split)
    assert set(stored) == set(expected)  # ids are the LMDB keys; the truncated record is skipped
    for image_id, (data, pixels) in stored.items():
      source_bytes, kind = expected[image_id]
      # The source pixels as an image reader sees them.
      source_pixels = np.asarray(Image.open(io.BytesIO(source_bytes)).convert('RGB'), np.int32)
      assert pixels.shape == source_pixels.shape and pixels.dtype == np.uint8
      error = np.abs(pixels - source_pixels)
      if kind == 'jpeg':  # stored unchanged, so decoded exactly as the source bytes decode
        assert data == source_bytes
        np.testing.assert_array_equal(pixels, tf.io.decode_jpeg(source_bytes, channels=3))
        assert error.mean() < 2 and error.max() <= 10  # TF's (fast) IDCT is not PIL's
      else:  # WebP, re-encoded as JPEG at quality 95
        assert data[:2] == b'\xff\xd8' and data != source_bytes
        assert error.mean() < 2 and error.max() < 40, (error.mean(), error.max())


def test_builder_prepares_the_lmdb_export_exactly(source, tmp_path):
  builder = tfds.builder(f'lsun_lmdb/{CATEGORY}', data_dir=str(tmp_path))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(
      manual_dir=str(source['manual']), try_download_gcs=False
    )
  )
  _check_prepared(builder, source)
  assert builder.info.features['image'].encoding_format == 'jpeg'


def _run_prepare(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
  return subprocess.run(
    [sys.executable, '-m', 'diffusion_jax.datasets.prepare', *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=300,
  )


def test_cli_prepares_from_zips_and_the_pipeline_reads_it(source, tmp_path):
  manual = tmp_path / 'manual'
  shutil.copytree(source['zips'], manual)
  data_dir = tmp_path / 'tfds'
  result = _run_prepare(
    f'--dataset=lsun_lmdb/{CATEGORY}', f'--data_dir={data_dir}', f'--manual_dir={manual}'
  )
  assert result.returncode == 0, result.stderr
  assert f'--config.dataset.name=lsun_lmdb/{CATEGORY} --config.dataset.data_dir={data_dir}' in (
    result.stdout
  )
  assert 'Unzipping' in result.stdout
  assert f'train {len(source["train"])}, validation {NUM_VAL}' in result.stdout
  assert (manual / f'{CATEGORY}_train_lmdb' / 'data.mdb').is_file()  # unzipped beside the zip

  dataset = config_defaults.get_config().dataset
  dataset.name, dataset.data_dir = f'lsun_lmdb/{CATEGORY}', str(data_dir)
  dataset.image_size, dataset.center_crop, dataset.num_channels = 32, True, 3
  builder = input_pipeline.get_builder(dataset)
  _check_prepared(builder, source)
  batches, num_batches = input_pipeline.create_eval_dataset(
    builder, dataset, 'validation', batch_size=4, process_index=0, process_count=1
  )
  batches = list(batches)
  assert num_batches == len(batches) == 2
  images = np.concatenate([batch['image'] for batch in batches])
  mask = np.concatenate([batch['mask'] for batch in batches])
  assert images.shape == (8, 32, 32, 3) and images.dtype == np.float32
  np.testing.assert_array_equal(mask, [1] * NUM_VAL + [0] * 2)
  assert -1 <= images.min() and images.max() <= 1

  # Center-cropped and resized: each image's mean pixel matches its source's central square.
  def central_mean(pixels: np.ndarray) -> float:
    size = min(pixels.shape[:2])
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top : top + size, left : left + size].mean() / 127.5 - 1

  expected = sorted(
    central_mean(np.asarray(Image.open(io.BytesIO(data)), np.float64))
    for data, _ in source['validation'].values()
  )
  np.testing.assert_allclose(sorted(images[:NUM_VAL].mean(axis=(1, 2, 3))), expected, atol=0.03)


def test_cli_missing_manual_files_is_one_clear_sentence(tmp_path):
  result = _run_prepare(f'--dataset=lsun_lmdb/{CATEGORY}', f'--data_dir={tmp_path}')
  assert result.returncode == 2
  assert 'Traceback' not in result.stdout + result.stderr
  manual = tmp_path / 'downloads' / 'manual'
  error = result.stderr.strip().splitlines()[-1]
  assert error == (
    f'error: No LSUN {CATEGORY} train LMDB in {manual}: expected the folder '
    f'{CATEGORY}_train_lmdb/ (with data.mdb) or {CATEGORY}_train_lmdb.zip there; download '
    f'http://dl.yf.io/lsun/scenes/{CATEGORY}_train_lmdb.zip, or `python download.py -c '
    f'{CATEGORY}` of https://github.com/fyu/lsun.'
  )


def test_object_categories_have_train_only_in_their_own_folder(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  assert lsun_lmdb.download_url('cat', 'train') == 'http://dl.yf.io/lsun/objects/cat.zip'
  with pytest.raises(lsun_lmdb.ManualFilesError, match=r'expected the folder cat/ .* or cat.zip'):
    lsun_lmdb.find_lmdb(manual, 'cat', 'train')
  image = _image(np.random.default_rng(1), 30, 20)
  _write_lmdb(manual / 'cat', {_key(0): _encode(image, 'JPEG')})
  builder = prepare.prepare('lsun_lmdb/cat', tmp_path / 'tfds', manual, say=lambda _: None)
  assert {split: info.num_examples for split, info in builder.info.splits.items()} == {'train': 1}


def test_celebahq_is_packed_from_progressive_gan_tfrecords(tmp_path):
  manual = tmp_path / 'manual' / 'celebahq'
  manual.mkdir(parents=True)
  images = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
  with tf.io.TFRecordWriter(str(manual / 'celebahq-r02.tfrecords')) as writer:
    for image in images:  # dataset_tool.py's format: uint8 CHW bytes and their shape
      chw = image.transpose(2, 0, 1)
      example = tf.train.Example(
        features=tf.train.Features(
          feature={
            'shape': tf.train.Feature(int64_list=tf.train.Int64List(value=chw.shape)),
            'data': tf.train.Feature(bytes_list=tf.train.BytesList(value=[chw.tobytes()])),
          }
        )
      )
      writer.write(example.SerializeToString())
  messages = []
  builder = prepare.prepare(
    'celeb_a_hq/4', tmp_path / 'tfds', tmp_path / 'manual', say=messages.append
  )
  assert (tmp_path / 'manual' / 'data4x4.tar').is_file()
  assert builder.info.splits['train'].num_examples == 5
  stored = {
    example['image/filename'].decode(): example['image']
    for example in tfds.as_numpy(builder.as_dataset(split='train'))
  }
  for index, image in enumerate(images):
    np.testing.assert_array_equal(stored[f'img{index:08d}.png'], image)
  assert any('Packed 5 images' in message for message in messages)
