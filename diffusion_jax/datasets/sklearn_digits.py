"""``sklearn_digits``: scikit-learn's bundled 8x8 handwritten digits as a native 8x8 TFDS dataset.

The 1797 images ship inside scikit-learn, so the dataset builds offline on first use.
8x8 because upscaling adds no information to the 8x8 source while multiplying the compute, and
8x8 suits a U-Net with 2 levels (8, 4) and attention at 4.
"""

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets
from sklearn import model_selection

IMAGE_SIZE = 8
NUM_TEST = 300
_SPLIT_SEED = 0
_CITATION = """\
@misc{alpaydin1998optical,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi = {10.24432/C50P49}
}"""


def to_image(digit: np.ndarray) -> np.ndarray:
  """Maps an 8x8 digit with values 0..16 to an 8x8x1 uint8 image with values round(v * 255 / 16)."""
  return np.round(digit * (255.0 / 16.0)).astype(np.uint8)[..., None]


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Returns the stratified, seeded train/test indices into ``load_digits()``."""
  train, test = model_selection.train_test_split(
    np.arange(len(labels)), test_size=NUM_TEST, stratify=labels, random_state=_SPLIT_SEED
  )
  return {'train': train, 'test': test}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits as 8x8x1 uint8 images, stratified into 1497 train / 300 test."""

  name = 'sklearn_digits'
  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
    '1.0.0': 'Initial release.',
    '2.0.0': 'Native 8x8, no upscaling.',
  }

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: ``dataset_info_from_configs()`` needs a dataset package directory.
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
          'label': tfds.features.ClassLabel(num_classes=10),
        }
      ),
      supervised_keys=('image', 'label'),
      homepage='https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits',
      citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data ships inside scikit-learn.
    digits = sk_datasets.load_digits()
    return {
      split: self._generate_examples(digits.images[indices], digits.target[indices], indices)
      for split, indices in split_indices(digits.target).items()
    }

  def _generate_examples(
    self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
  ) -> Iterator[tuple[int, dict[str, object]]]:
    for index, digit, label in zip(indices, images, labels):
      yield int(index), {'image': to_image(digit), 'label': int(label)}
