"""The ``digits`` evaluator: the digits metric of samples (``diffusion_jax.digits_metric``), a
small classifier's Fréchet distance to real digits, its confident fraction and the class balance.

The metric needs the images themselves: they are all-gathered as uint8 (32 kB at 500 8x8
samples) and scored on every host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from diffusion_jax import digits_classifier, digits_metric, images, input_pipeline, sampling
from diffusion_jax import run as run_lib
from diffusion_jax.config_rules import Problems
from diffusion_jax.evaluators import samples
from diffusion_jax.evaluators.base import Evaluator, Program

# Metric -> console label; each is written as eval/digits_<metric>.
LABELS = {
  'digits_confident_fraction': 'confident',
  'digits_fd': 'FD',
  'digits_min_class_fraction': 'min class',
  'digits_max_class_fraction': 'max class',
  'digits_class_accuracy': 'asked class',  # class-conditional models
}


def problems(
  name: str, settings: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> Problems:
  """The sample settings (a covariance needs 2 samples), and a digits data set."""
  found = samples.problems(name, settings, minimum=2)
  dataset = str(config.dataset.name).split(':')[0]
  if dataset != digits_classifier.DATASET_NAME:
    found[f'evals.{name}.type'] = (
      f'evals.{name}.type="digits" scores only {digits_classifier.DATASET_NAME!r}, but '
      f'dataset.name is {config.dataset.name!r}; use --config.evals.{name}.type=inception.'
    )
  return found


@dataclasses.dataclass(frozen=True)
class DigitsScore:
  """The digits metric against a real split's feature statistics; a ``samples.ScoreFn``."""

  classifier: digits_classifier.DigitsClassifier
  reference: tuple[np.ndarray, np.ndarray]
  labels: tuple[int, ...] | None = None  # a class-conditional run: sample.labels
  num_classes: int | None = None

  @classmethod
  def create(
    cls,
    builder: tfds.core.DatasetBuilder,
    reference_split: str,
    *,
    cache_dir: epath.PathLike | None,
  ) -> DigitsScore:
    """Loads (or trains) the classifier and the reference statistics, cached in ``cache_dir``."""
    classifier = digits_classifier.load_or_train_classifier(builder, cache_dir=cache_dir)
    reference = digits_metric.reference_stats(
      builder, reference_split, classifier=classifier, cache_dir=cache_dir
    )
    return cls(classifier, reference)

  def __call__(self, chunks: Iterable[jax.Array], num_samples: int) -> dict[str, Any]:
    """``digits_<metric>`` of the first ``num_samples`` samples and the class histogram."""
    pixels = np.concatenate(
      [images.to_uint8(rows) for rows in samples.gathered_rows(chunks, num_samples)]
    )
    asked = None
    if self.num_classes is not None:
      asked = sampling.class_labels(self.labels, self.num_classes, np.arange(len(pixels)))
    metrics = digits_metric.digits_metrics(self.classifier, pixels, self.reference, labels=asked)
    names = [name.removeprefix('digits_') for name in LABELS] + ['class_histogram']
    return {f'digits_{name}': metrics[name] for name in names if name in metrics}


def create(
  name: str, settings: ml_collections.ConfigDict, run: run_lib.Run, *, in_loop: bool
) -> Evaluator:
  """The digits metric of the run's samples against ``settings``' reference split."""
  split = samples.reference_split(settings)
  input_pipeline.check_splits(run.builder, {f'evals.{name}.reference_split': split})
  score = DigitsScore.create(run.builder, split, cache_dir=settings.reference_dir)
  score = dataclasses.replace(score, labels=run.sampler.labels, num_classes=run.model.num_classes)
  return samples.create(settings, run, score, in_loop=in_loop)


def programs(settings: ml_collections.ConfigDict, run: run_lib.Run) -> dict[str, Program]:
  """The sampler (the classifier scores gathered uint8 images on every host)."""
  return samples.programs(settings, run)
