"""Question 6: images per second per host through the train input pipeline, against what a TPU
v3-8 consumes at the paper's speed.

  python -m benchmarks.input_pipeline [--seconds=20]

The benchmark writes two synthetic TFDS data sets (real record files, prepared by tiny
``GeneratorBasedBuilder``s) into a temporary data dir: CIFAR-shaped 32x32 PNGs (as TFDS's
cifar10) and 256x341 JPEGs (as LSUN's, whose shorter side is 256; ``lsun_lmdb`` stores the
release's JPEG bytes). Images are smooth gradients with shapes and mild noise, so that their
files have realistic sizes. It then reads them with ``input_pipeline.create_train_iterator``
(decode, LSUN's center crop and resize, flips, scaling to [-1, 1], batching) with the CIFAR10
and LSUN bedroom configs at their global batch (the whole v3-8 host's batch), and reports images
per second after a warm-up (the shuffle buffer filled). The v3-8 need is the paper's speed:
21 steps/s x 128 (CIFAR10) and 2.2 steps/s x 64 (256x256).
"""

import os
import pathlib
import sys
import tempfile
import time

from absl import app, flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import load_config  # noqa: E402

_SECONDS = flags.DEFINE_float('seconds', 20.0, 'Timed seconds per data set.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Where to write the data sets (default: temp).')
NEEDED = {'cifar10': (21.0, 128), 'lsun_bedroom': (2.2, 64)}  # paper's v3-8 steps/s, batch


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A uint8 RGB image: a colour gradient, a few rectangles and mild noise."""
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  image = rng.uniform(0, 255, 3) + np.stack([x, y, x * y], -1) @ rng.uniform(-128, 128, (3, 3))
  for _ in range(3):
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[top : top + height // 3, left : left + width // 3] = rng.uniform(0, 255, 3)
  image += rng.normal(0, 6, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


class _Synthetic(tfds.core.GeneratorBasedBuilder):
  """Synthetic images in one ``train`` split (subclasses set the size, format and count)."""

  VERSION = tfds.core.Version('1.0.0')
  SHAPE: tuple[int, int] = (32, 32)
  ENCODING = 'png'
  NUM_EXAMPLES = 1000

  def _info(self) -> tfds.core.DatasetInfo:
    image = tfds.features.Image(shape=(None, None, 3), encoding_format=self.ENCODING)
    return tfds.core.DatasetInfo(
      builder=self, features=tfds.features.FeaturesDict({'image': image})
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(self.NUM_EXAMPLES):
      yield i, {'image': synthetic_image(rng, *self.SHAPE)}


class BenchCifar(_Synthetic):
  """10,000 CIFAR-shaped 32x32 PNGs."""

  name = 'bench_cifar'
  NUM_EXAMPLES = 10_000


class BenchLsun(_Synthetic):
  """1,000 LSUN-shaped 256x341 JPEGs."""

  name = 'bench_lsun'
  SHAPE = (256, 341)
  ENCODING = 'jpeg'
  NUM_EXAMPLES = 1000


BUILDERS = {'cifar10': BenchCifar, 'lsun_bedroom': BenchLsun}


def measure(config_name: str, data_dir: str, seconds: float) -> dict:
  from diffusion_jax import input_pipeline

  builder_cls = BUILDERS[config_name]
  builder = builder_cls(data_dir=data_dir)
  if not builder.is_prepared():
    start = time.perf_counter()
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    print(f'  wrote {builder.name} in {time.perf_counter() - start:.0f} s', file=sys.stderr)
  config = load_config(config_name, [f'dataset.name={builder.name!r}'])
  config.dataset.data_dir = data_dir
  batch = config.train.batch_size
  iterator = input_pipeline.create_train_iterator(
    input_pipeline.get_builder(config.dataset),
    config.dataset,
    batch_size=batch,
    steps_per_call=1,
    seed=0,
    process_index=0,
    process_count=1,
  )
  shape = next(iterator)['image'].shape
  warm_until = time.perf_counter() + min(10.0, seconds / 2)
  while time.perf_counter() < warm_until:  # fill the shuffle buffer, let AUTOTUNE settle
    next(iterator)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    count += next(iterator)['image'].shape[1]
  elapsed = time.perf_counter() - start
  files = pathlib.Path(builder.data_dir).iterdir()
  size = sum(f.stat().st_size for f in files if '.tfrecord' in f.name)
  return dict(
    images_per_second=count / elapsed,
    batch=batch,
    shape=shape,
    bytes_per_image=size / builder.info.splits['train'].num_examples,
    center_crop=config.dataset.center_crop,
    flip=config.dataset.random_flip,
  )


def main(argv):
  del argv
  tf.config.set_visible_devices([], 'GPU')
  print(f'Machine: {common.machine()}; tf.data threads: AUTOTUNE over {os.cpu_count()} cores')
  rows, last = [], []
  with tempfile.TemporaryDirectory(prefix='bench_tfds_') as tmp:
    data_dir = _DATA_DIR.value or tmp
    for name, (steps_per_s, batch) in NEEDED.items():
      r = measure(name, data_dir, _SECONDS.value)
      need = steps_per_s * batch
      h, w = BUILDERS[name].SHAPE
      rows.append(
        (
          f'{name}.py',
          f'{h}x{w} {BUILDERS[name].ENCODING.upper()}, {r["bytes_per_image"] / 1024:.1f} KiB',
          ('center crop, resize to 256; ' if r['center_crop'] else '')
          + ('flip; ' if r['flip'] else 'no flip; ')
          + 'scale',
          r['batch'],
          f'{r["images_per_second"]:,.0f}',
          f'{r["images_per_second"] / os.cpu_count():,.0f}',
          f'{need:,.0f}',
          f'{r["images_per_second"] / need:.2f}x',
        )
      )
      last.append(
        f'{name} {r["images_per_second"]:,.0f} img/s = {r["images_per_second"] / need:.2f}x'
      )
  print(
    common.table(
      [
        'config',
        'stored images',
        'preprocessing',
        'host batch',
        'images / s here',
        'per core',
        'v3-8 needs (paper)',
        'here / need',
      ],
      rows,
    )
  )
  print("Input pipeline on this host vs a v3-8's need: " + '; '.join(last))


if __name__ == '__main__':
  app.run(main)
