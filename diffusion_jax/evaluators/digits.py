"""The digits metric of samples (``diffusion_jax.digits_metric``): a small classifier's Fréchet
distance to real digits, its confident fraction and the class balance.

The metric needs the images themselves: they are all-gathered as uint8 (32 kB at 500 8x8
samples) and scored on every host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from diffusion_jax import digits_metric, images
from diffusion_jax.evaluators import samples

# digits_metric.digits_metrics's names, reported as 'digits_<name>'.
METRICS = (
  'fd',
  'confident_fraction',
  'min_class_fraction',
  'max_class_fraction',
  'class_histogram',
)


@dataclasses.dataclass(frozen=True)
class DigitsEvaluator:
  """The digits metric against a real split's feature statistics; a ``samples.ScoreFn``."""

  classifier: digits_metric.DigitsClassifier
  reference: tuple[np.ndarray, np.ndarray]

  @classmethod
  def create(
    cls,
    builder: tfds.core.DatasetBuilder,
    reference_split: str,
    *,
    cache_dir: epath.PathLike | None,
  ) -> DigitsEvaluator:
    """Loads (or trains) the classifier and the reference statistics, cached in ``cache_dir``."""
    classifier = digits_metric.load_or_train_classifier(builder, cache_dir=cache_dir)
    reference = digits_metric.reference_stats(
      builder, reference_split, classifier=classifier, cache_dir=cache_dir
    )
    return cls(classifier, reference)

  def __call__(self, chunks: Iterable[jax.Array], num_samples: int) -> dict[str, Any]:
    """``digits_<name>`` of ``METRICS`` for the first ``num_samples`` samples."""
    pixels = np.concatenate(
      [images.to_uint8(rows) for rows in samples.gathered_rows(chunks, num_samples)]
    )
    metrics = digits_metric.digits_metrics(self.classifier, pixels, self.reference)
    return {f'digits_{name}': metrics[name] for name in METRICS}
