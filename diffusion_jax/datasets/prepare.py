"""Prepares a TFDS dataset of this project in a data dir, offline from manual files where it can.

  python -m diffusion_jax.datasets.prepare --dataset=lsun_lmdb/bedroom --data_dir=DIR \\
      [--manual_dir=DIR]

``--manual_dir`` defaults to TFDS's manual dir ``<data_dir>/downloads/manual``. What it needs:

  lsun_lmdb/C     the LSUN LMDB exports of category C, unzipped or as the release's zips
                  (unzipped beside them): ``C_train_lmdb/`` and ``C_val_lmdb/`` for scenes,
                  ``C/`` for objects such as cat (see ``lsun_lmdb``). Must be a local folder.
  celeb_a_hq/R    ``dataRxR.tar`` of the 30,000 RxR PNGs that TFDS's ``celeb_a_hq`` reads, or
                  progressive_growing_of_gans' ``celebahq-rNN.tfrecords`` (NN = log2 R, also
                  looked for in ``celebahq/``), which is packed into that tar here.
  sklearn_digits  nothing: built from scikit-learn.
  anything else   TFDS downloads it (internet needed); files of TFDS's names in the manual dir
                  are used instead of downloading them.

It prints what it found and did, the splits, and the ``--config.dataset.*`` flags to train with.
An error the user can fix (missing or broken manual files, an unknown name) is one sentence on
stderr and exit status 2. See docs/datasets.md for each data set of the paper end to end.
"""

from __future__ import annotations

import io
import math
import os
import sys
import tarfile
from collections.abc import Callable, Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from etils import epath  # noqa: E402
from PIL import Image  # noqa: E402

from diffusion_jax.datasets import lsun_lmdb  # noqa: E402  (also registers the project's builders)
from diffusion_jax.errors import SetupError  # noqa: E402

Report = Callable[[str], None]
CELEBAHQ_IMAGES = 30_000


# Raw files that TFDS cannot download itself, by builder name; ``{...}`` is filled per builder.
_MANUAL_STEPS = {
  'lsun_lmdb': (
    'Not with that command: LSUN is prepared offline from the LMDB zips of its release. Run\n'
    '  python -m diffusion_jax.datasets.prepare --dataset=lsun_lmdb/{config} '
    '--data_dir={data_dir}\n'
    'It names the files it needs and where to download them (http://dl.yf.io/lsun/, or\n'
    '`python download.py -c {config}` of https://github.com/fyu/lsun for scene categories),\n'
    'reads them, zipped or unzipped, from {manual_dir}\n'
    '(or from --manual_dir=FOLDER, a local folder) and prints the flags to train with.\n'
    'Step by step: docs/datasets.md.'
  ),
  'lsun': (
    "Not with that command: TFDS's lsun builder reads LMDB with tensorflow-io, which does not\n"
    'load with the pinned TensorFlow. Use --config.dataset.name=lsun_lmdb/{config} instead and\n'
    'prepare it offline from the LSUN LMDB zips with\n'
    '  python -m diffusion_jax.datasets.prepare --dataset=lsun_lmdb/{config} '
    '--data_dir={data_dir}\n'
    'Step by step: docs/datasets.md.'
  ),
  'celeb_a_hq': (
    'Not with that command: CelebA-HQ cannot be downloaded. Create it from CelebA (img_celeba.7z,\n'
    "list_landmarks_celeba.txt) and the CelebA-HQ delta files with progressive_growing_of_gans'\n"
    '`dataset_tool.py create_celebahq`, then run\n'
    '  python -m diffusion_jax.datasets.prepare --dataset=celeb_a_hq/{config} '
    '--data_dir={data_dir} --manual_dir=FOLDER\n'
    'where FOLDER holds its celebahq-rNN.tfrecords (r08 for 256x256) or a tar\n'
    'data{config}x{config}.tar of the 30,000 {config}x{config} PNGs.\n'
    'Step by step: docs/datasets.md.'
  ),
}


def instructions(builder: tfds.core.DatasetBuilder) -> str:
  """Returns how to prepare ``builder``'s dataset in its data dir, with manual steps if needed."""
  name = builder.info.full_name.rsplit('/', 1)[0]  # 'lsun/bedroom', without the version
  data_dir = builder.data_dir_root
  command = (
    'python -c "import tensorflow_datasets as tfds; '
    f"tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare()\""
  )
  message = (
    f"Dataset '{name}' is not prepared in {data_dir} (expected {builder.data_dir}).\n"
    f'Prepare it on a machine with internet access (the `tfds build` CLI of this stack\n'
    f'needs apache_beam):\n  {command}\n'
    'or re-run training with --config.dataset.download=True on a machine with internet '
    'access.'
  )
  if builder.name in _MANUAL_STEPS:
    steps = _MANUAL_STEPS[builder.name].format(
      config=builder.builder_config.name,
      data_dir=data_dir,
      manual_dir=builder.data_dir_root / 'downloads' / 'manual',
    )
    message += f'\nManual steps:\n{steps}'
  return message


def _say(message: str) -> None:
  print(message, flush=True)


def default_manual_dir(data_dir: epath.PathLike) -> epath.Path:
  """TFDS's manual dir of a data dir: ``<data_dir>/downloads/manual``."""
  return epath.Path(data_dir) / 'downloads' / 'manual'


def _show(path: epath.PathLike) -> str:
  """A local path made absolute (so the printed flags work from anywhere); URLs unchanged."""
  path = os.fspath(path)
  return path if '://' in path else os.path.abspath(path)


def _builder(name: str, data_dir: epath.PathLike) -> tfds.core.DatasetBuilder:
  """``tfds.builder``, with an unknown dataset or config as a SetupError."""
  dataset, _, config = name.split(':')[0].partition('/')
  config = config.split('/')[0]  # without builder kwargs (``name/config/a=1``)
  try:
    cls = tfds.builder_cls(dataset)
  except tfds.core.registered.DatasetNotFoundError:
    raise SetupError(
      f'TFDS has no dataset {dataset!r}; this project trains on lsun_lmdb/<category>, '
      'celeb_a_hq/<resolution>, cifar10 and sklearn_digits.'
    ) from None
  if cls.BUILDER_CONFIGS and config and config not in cls.builder_configs:
    raise SetupError(
      f'{dataset} has no config {config!r}; choose one of {", ".join(cls.builder_configs)}.'
    )
  return tfds.builder(name, data_dir=os.fspath(data_dir))


def _check_lsun(
  builder: tfds.core.DatasetBuilder, manual_dir: epath.Path, say: Report
) -> dict[str, int]:
  """Finds (and unzips) every LMDB set of the category before TFDS starts; returns the number
  of records of each split."""
  category = builder.builder_config.name
  records = {}
  for split, release_split in lsun_lmdb.release_splits(category).items():
    path = lsun_lmdb.find_lmdb(manual_dir, category, release_split, report=say)
    records[split] = lsun_lmdb.num_records(path)
    say(f'{split}: {records[split]:,} records in {path}')
  return records


def pack_celebahq(tfrecords: epath.Path, tar_path: epath.Path, resolution: int) -> int:
  """Writes each image of a progressive_growing_of_gans ``celebahq-rNN.tfrecords`` (uint8 CHW
  arrays) as ``imgNNNNNNNN.png`` into the tar TFDS's ``celeb_a_hq`` reads; returns the count."""
  partial = tar_path.parent / f'{tar_path.name}.incomplete'
  count = 0
  with tarfile.open(os.fspath(partial), 'w') as tar:
    for record in tf.data.TFRecordDataset(os.fspath(tfrecords)).as_numpy_iterator():
      feature = tf.train.Example.FromString(record).features.feature
      shape = tuple(feature['shape'].int64_list.value)
      if shape != (3, resolution, resolution):
        partial.unlink()
        raise SetupError(
          f'{tfrecords} holds {shape} (CHW) images, not (3, {resolution}, {resolution}); '
          f'use the celebahq-r{int(math.log2(resolution)):02d}.tfrecords of dataset_tool.py.'
        )
      image = np.frombuffer(feature['data'].bytes_list.value[0], np.uint8).reshape(shape)
      png = io.BytesIO()
      Image.fromarray(image.transpose(1, 2, 0)).save(png, format='PNG')
      info = tarfile.TarInfo(f'img{count:08d}.png')
      info.size = png.tell()
      png.seek(0)
      tar.addfile(info, png)
      count += 1
  partial.rename(tar_path)
  return count


def _check_celebahq(builder: tfds.core.DatasetBuilder, manual_dir: epath.Path, say: Report) -> None:
  """Finds ``dataRxR.tar``, or packs it from the matching progressive_growing_of_gans tfrecords."""
  resolution = builder.builder_config.resolution
  tar_path = manual_dir / builder.builder_config.file_name
  if tar_path.is_file():
    say(f'Using {tar_path}')
    return {}
  name = f'celebahq-r{int(math.log2(resolution)):02d}.tfrecords'
  for tfrecords in (manual_dir / name, manual_dir / 'celebahq' / name):
    if tfrecords.is_file():
      say(f'Packing the {resolution}x{resolution} images of {tfrecords} into {tar_path} ...')
      count = pack_celebahq(tfrecords, tar_path, resolution)
      note = '' if count == CELEBAHQ_IMAGES else f' (the full CelebA-HQ has {CELEBAHQ_IMAGES:,})'
      say(f'Packed {count:,} images{note}.')
      return {'train': count}
  raise SetupError(
    f'Neither {tar_path.name} nor {name} is in {manual_dir}: CelebA-HQ cannot be downloaded; '
    "create it from CelebA's img_celeba.7z and the CelebA-HQ deltas with "
    "progressive_growing_of_gans' dataset_tool.py create_celebahq and put its "
    f'{name} there, as docs/datasets.md describes.'
  )


def _refuse_tfds_lsun(
  builder: tfds.core.DatasetBuilder, manual_dir: epath.Path, say: Report
) -> dict[str, int]:
  """TFDS's ``lsun`` cannot generate with this stack: points at ``lsun_lmdb``."""
  raise SetupError(
    "TFDS's lsun builder reads LMDB with tensorflow-io, which does not load with the pinned "
    f'TensorFlow; prepare lsun_lmdb/{builder.builder_config.name} instead.'
  )


# Checks (and manual steps) before TFDS's download_and_prepare, by builder name; they return the
# number of source records per split where they know it.
_MANUAL_CHECKS = {
  lsun_lmdb.LsunLmdb.name: _check_lsun,
  'celeb_a_hq': _check_celebahq,
  'lsun': _refuse_tfds_lsun,
}


def dataset_name(builder: tfds.core.DatasetBuilder) -> str:
  """The name ``config.dataset.name`` takes: ``lsun_lmdb/bedroom``, without the version."""
  return builder.info.full_name.rsplit('/', 1)[0]


def prepare(
  name: str,
  data_dir: epath.PathLike,
  manual_dir: epath.PathLike | None = None,
  say: Report = _say,
) -> tfds.core.DatasetBuilder:
  """Prepares dataset ``name`` in ``data_dir`` from the files in ``manual_dir``; returns its
  builder. Raises SetupError if manual files are missing or unusable."""
  builder = _builder(name, data_dir)
  full_name = dataset_name(builder)
  if builder.is_prepared():
    say(f'{full_name} {builder.version} is already prepared in {_show(builder.data_dir)}.')
    return builder
  manual_dir = epath.Path(manual_dir) if manual_dir else default_manual_dir(data_dir)
  check = _MANUAL_CHECKS.get(builder.name)
  records = {}
  if check is not None:
    say(f'Reading the manual files of {full_name} from {_show(manual_dir)}')
    records = check(builder, manual_dir, say)
  elif builder.name != 'sklearn_digits':
    say(
      f'TFDS downloads the files of {full_name} (internet needed) unless they are in {manual_dir}'
    )
  say(f'Preparing {full_name} {builder.version} in {_show(builder.data_dir)} ...')
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
  )
  for split, count in records.items():
    skipped = count - builder.info.splits[split].num_examples
    if skipped:
      say(f'{split}: skipped {skipped:,} unreadable records (their ids are in the warnings).')
  return builder


def summary(builder: tfds.core.DatasetBuilder, data_dir: epath.PathLike) -> str:
  """The splits of a prepared dataset and the flags that train on it (and how to upload it)."""
  splits = ', '.join(
    f'{split} {info.num_examples:,}' for split, info in sorted(builder.info.splits.items())
  )
  data_dir = _show(data_dir)
  lines = [
    f'{dataset_name(builder)} {builder.version} examples: {splits}.',
    'Train with:',
    f'  --config.dataset.name={dataset_name(builder)} --config.dataset.data_dir={data_dir}',
  ]
  if '://' not in data_dir:
    lines += [
      'On Cloud TPU, copy the prepared data (not downloads/) to a bucket and use that data dir:',
      f'  gcloud storage cp -r {os.path.join(data_dir, builder.name)} '
      'gs://BUCKET/tensorflow_datasets/',
    ]
  return '\n'.join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing never clashes)."""
  flags.DEFINE_string(
    'dataset', None, 'A TFDS name with its config, e.g. lsun_lmdb/bedroom, celeb_a_hq/256.'
  )
  flags.DEFINE_string('data_dir', None, 'The TFDS data dir to prepare it in.')
  flags.DEFINE_string(
    'manual_dir', None, 'Where the manual files are (default: <data_dir>/downloads/manual).'
  )
  flags.mark_flags_as_required(['dataset', 'data_dir'])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # TFDS's INFO lines drown what this prints
  try:
    builder = prepare(FLAGS.dataset, FLAGS.data_dir, FLAGS.manual_dir)
  except SetupError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    raise SystemExit(2) from None
  _say(summary(builder, FLAGS.data_dir))


if __name__ == '__main__':
  define_flags()
  app.run(main)
