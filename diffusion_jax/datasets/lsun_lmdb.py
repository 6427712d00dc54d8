"""``lsun_lmdb``: the LSUN release's LMDB exports as a TFDS dataset, read with the ``lmdb`` package.

TFDS's own ``lsun`` builder reads LMDB through tensorflow-io, which does not load with the pinned
TensorFlow. This builder reads the same files with ``lmdb`` and never touches the network: the
exports are manual files, unzipped folders or the release's zips (unzipped on first use, beside
the zip). One config per category:

- the 10 scene categories (``bedroom``, ``church_outdoor``, ...): splits ``train`` and
  ``validation`` (the release's ``val``; its test set is unlabelled and shared by all categories,
  so there is no ``test`` split). Files ``<category>_train_lmdb/``, ``<category>_val_lmdb/``, or
  ``<category>_train_lmdb.zip``, ``<category>_val_lmdb.zip`` from http://dl.yf.io/lsun/scenes/.
- the 20 object categories (``cat``, ...): only ``train``. Files ``<category>/`` or
  ``<category>.zip`` from http://dl.yf.io/lsun/objects/.

Examples: ``image`` (JPEG; the stored bytes unchanged when they are an RGB or grayscale JPEG, any
other image, e.g. WebP, decoded and re-encoded as JPEG at quality 95) and ``id`` (the LMDB key).
Records that do not decode are skipped with a warning. Prepare with
``python -m diffusion_jax.datasets.prepare --dataset=lsun_lmdb/bedroom --data_dir=DIR``.
"""

import io
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator

import lmdb
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from diffusion_jax.errors import SetupError

SCENES = (
  'bedroom',
  'bridge',
  'church_outdoor',
  'classroom',
  'conference_room',
  'dining_room',
  'kitchen',
  'living_room',
  'restaurant',
  'tower',
)
OBJECTS = (
  'airplane',
  'bicycle',
  'bird',
  'boat',
  'bottle',
  'bus',
  'car',
  'cat',
  'chair',
  'cow',
  'dining_table',
  'dog',
  'horse',
  'motorbike',
  'person',
  'potted_plant',
  'sheep',
  'sofa',
  'train',
  'tv-monitor',
)
RELEASE_URL = 'http://dl.yf.io/lsun/'
DOWNLOAD_SCRIPT = 'https://github.com/fyu/lsun'
REENCODE_QUALITY = 95
_KEPT_MODES = ('RGB', 'L')  # JPEGs that TF's decoder turns into RGB exactly as they are
_CITATION = """\
@article{yu15lsun,
  author = {Yu, Fisher and Zhang, Yinda and Song, Shuran and Seff, Ari and Xiao, Jianxiong},
  title = {{LSUN}: Construction of a Large-scale Image Dataset using Deep Learning with Humans
           in the Loop},
  journal = {arXiv preprint arXiv:1506.03365},
  year = {2015}
}"""


class ManualFilesError(SetupError):
  """The LMDB export of a category is missing or unreadable; the message says what to download."""


def release_splits(category: str) -> dict[str, str]:
  """TFDS split -> the release's set name: scenes have ``train`` and ``val``, objects ``train``."""
  if category in SCENES:
    return {'train': 'train', 'validation': 'val'}
  if category in OBJECTS:
    return {'train': 'train'}
  raise ValueError(f'Unknown LSUN category {category!r}; choose one of {SCENES + OBJECTS}.')


def lmdb_name(category: str, release_split: str) -> str:
  """The release's folder (and zip stem): ``bedroom_train_lmdb``; objects: ``cat``."""
  return f'{category}_{release_split}_lmdb' if category in SCENES else category


def download_url(category: str, release_split: str) -> str:
  """Where the release serves the zip of ``lmdb_name(category, release_split)``."""
  folder = 'scenes' if category in SCENES else 'objects'
  return f'{RELEASE_URL}{folder}/{lmdb_name(category, release_split)}.zip'


def _lmdb_in(folder: epath.Path) -> epath.Path | None:
  """``folder`` if it holds ``data.mdb``, or its same-named subfolder if that one does."""
  for candidate in (folder, folder / folder.name):
    if (candidate / 'data.mdb').is_file():
      return candidate
  return None


def unzip(
  archive: epath.Path, name: str, report: Callable[[str], None] = logging.info
) -> epath.Path:
  """Extracts the release zip ``archive`` (streamed) and moves its ``name/`` folder beside it."""
  target = archive.parent / name
  if target.exists() and any(target.iterdir()):
    raise ManualFilesError(
      f'{target} exists but holds no data.mdb, so {archive} cannot be unzipped there; remove it.'
    )
  partial = archive.parent / f'.{name}.incomplete'
  if partial.exists():
    shutil.rmtree(partial)
  report(f'Unzipping {archive} into {target} ...')
  try:
    with zipfile.ZipFile(archive) as zipped:
      zipped.extractall(partial)
  except zipfile.BadZipFile as e:
    shutil.rmtree(partial, ignore_errors=True)
    raise ManualFilesError(
      f'{archive} is not a whole zip ({e}); download it again from {RELEASE_URL}.'
    ) from None
  except OSError as e:  # e.g. a full disk
    shutil.rmtree(partial, ignore_errors=True)
    raise ManualFilesError(f'{archive} could not be unzipped into {partial} ({e}).') from None
  found = _lmdb_in(partial / name) or _lmdb_in(partial)
  if found is None:
    shutil.rmtree(partial)
    raise ManualFilesError(
      f'{archive} holds no {name}/data.mdb; it is not the LSUN release file of that name '
      f'(download it from {RELEASE_URL}).'
    )
  found.rename(target)
  shutil.rmtree(partial, ignore_errors=True)
  return target


def find_lmdb(
  manual_dir: epath.PathLike,
  category: str,
  release_split: str,
  report: Callable[[str], None] = logging.info,
) -> epath.Path:
  """The LMDB folder of one set of a category in ``manual_dir``, unzipping the zip if needed.

  Raises ManualFilesError (one sentence: what is missing, where it was looked for, where to
  download it) if neither the folder nor the zip is there.
  """
  manual_dir = epath.Path(manual_dir)
  name = lmdb_name(category, release_split)
  if '://' in os.fspath(manual_dir):
    raise ManualFilesError(
      f'LMDB cannot be read from {manual_dir}: give a local folder holding {name}/ as '
      '--manual_dir (copy only the prepared data dir to the cloud).'
    )
  found = _lmdb_in(manual_dir / name)
  if found is None and (manual_dir / f'{name}.zip').is_file():
    found = unzip(manual_dir / f'{name}.zip', name, report)
  if found is None:
    script = (
      f', or `python download.py -c {category}` of {DOWNLOAD_SCRIPT}' if category in SCENES else ''
    )
    raise ManualFilesError(
      f'No LSUN {category} {release_split} LMDB in {manual_dir}: expected the folder {name}/ '
      f'(with data.mdb) or {name}.zip there; download {download_url(category, release_split)}'
      f'{script}.'
    )
  return found


def _open(path: epath.Path) -> lmdb.Environment:
  """Opens an LMDB folder read-only, without a lock file (the folder may be read-only)."""
  try:
    return lmdb.open(os.fspath(path), readonly=True, lock=False, readahead=False, meminit=False)
  except lmdb.Error as e:
    raise ManualFilesError(
      f'{path} is not a readable LMDB ({e}); unzip the LSUN release file again.'
    ) from None


def num_records(path: epath.Path) -> int:
  """The number of records in the LMDB folder ``path``."""
  env = _open(path)
  try:
    return env.stat()['entries']
  finally:
    env.close()


def read_lmdb(path: epath.Path) -> Iterator[tuple[bytes, bytes]]:
  """(key, value) of every record of the LMDB folder ``path``, in key order."""
  env = _open(path)
  try:
    with env.begin(write=False) as txn:
      yield from txn.cursor()
  finally:
    env.close()


def jpeg_bytes(data: bytes) -> bytes:
  """``data`` itself if it is an RGB or grayscale JPEG, else the image re-encoded as JPEG.

  The whole JPEG stream is decoded (at 1/8 scale, cheap) so truncated files raise OSError here,
  not in the training input pipeline.
  """
  with Image.open(io.BytesIO(data)) as image:
    if image.format == 'JPEG' and image.mode in _KEPT_MODES:
      image.draft(image.mode, (1, 1))
      image.load()
      return data
    buffer = io.BytesIO()
    image.convert('RGB').save(buffer, format='JPEG', quality=REENCODE_QUALITY)
    return buffer.getvalue()


class LsunLmdb(tfds.core.GeneratorBasedBuilder):
  """LSUN categories from the release's LMDB exports (manual files), read without tensorflow-io."""

  name = 'lsun_lmdb'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: LMDB read with the lmdb package.'}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(
      name=category,
      description=f'LSUN {category}: ' + ', '.join(release_splits(category)) + ' split(s).',
    )
    for category in SCENES + OBJECTS
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Put the category's LMDB exports into manual_dir, unzipped or as the release's zips:
  scenes <category>_train_lmdb/ and <category>_val_lmdb/ (or the .zip files of these names from
  {RELEASE_URL}scenes/, e.g. via `python download.py -c <category>` of {DOWNLOAD_SCRIPT}),
  objects <category>/ (or <category>.zip from {RELEASE_URL}objects/). Then run
  python -m diffusion_jax.datasets.prepare --dataset=lsun_lmdb/<category> --data_dir=DIR
  """

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: ``dataset_info_from_configs()`` needs a dataset package directory.
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(encoding_format='jpeg'),
          'id': tfds.features.Text(),
        }
      ),
      homepage='https://www.yf.io/p/lsun',
      citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    category = self.builder_config.name
    # Every set is found (and unzipped) before any is generated.
    paths = {
      split: find_lmdb(dl_manager.manual_dir, category, release_split)
      for split, release_split in release_splits(category).items()
    }
    return {split: self._generate_examples(path) for split, path in paths.items()}

  def _generate_examples(self, path: epath.Path) -> Iterator[tuple[str, dict[str, object]]]:
    for key, value in read_lmdb(path):
      image_id = key.decode('utf-8')
      try:
        image = jpeg_bytes(value)
      except (OSError, SyntaxError, ValueError) as e:
        logging.warning('Skipping record %s of %s: not a readable image (%s).', image_id, path, e)
        continue
      yield image_id, {'image': image, 'id': image_id}
