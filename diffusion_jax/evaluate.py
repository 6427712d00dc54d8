"""Evaluation of the EMA model: builds the evaluators (``diffusion_jax.evaluators``) from the
config, runs them and writes what they return.

One ``Evaluator`` serves both ``--mode=eval`` (``evaluate_checkpoint``: ``eval.num_samples``
samples, the whole NLL split, a report folder) and the train loop (``make_in_loop_evaluator``:
``eval.in_loop_num_samples``, scalars only). Everything collective runs on every host. Its keys
come from the ``eval`` stream: the samples from ``fold_in(key, 0)``, the bound's noise from
``fold_in(key, 1)``, so in-loop evaluations at different steps share their noise.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from clu import metric_writers
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import (
  console,
  fid,
  images,
  input_pipeline,
  models,
  rngs,
  sampling,
  train_state,
  validation,
)
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax.errors import SetupError
from diffusion_jax.evaluators import bound, digits, inception, samples

NUM_GRID_IMAGES = 64


def bound_split(config: ml_collections.ConfigDict) -> str | None:
  """The split of the bound: ``eval.nll_split``, else the data set's held-out ``eval_split`` (None
  if it has none), cut to ``eval.nll_num_examples``."""
  split = config.eval.nll_split or config.dataset.eval_split
  return None if split is None else first_examples(split, config.eval.nll_num_examples)


def reference_split(config: ml_collections.ConfigDict) -> str:
  """The FID reference split: ``eval.reference_split`` cut to ``eval.reference_num_examples``."""
  return first_examples(config.eval.reference_split, config.eval.reference_num_examples)


# Scalar name -> what a person reads on the console.
_NAMES = {
  'eval/digits_confident_fraction': 'confident',
  'eval/digits_fd': 'FD',
  'eval/digits_min_class_fraction': 'min class',
  'eval/digits_max_class_fraction': 'max class',
  'eval/fid': 'FID',
  'eval/is': 'IS',
  'eval/is_std': 'IS std',
  'eval/bpd': 'bits/dim',
  'eval/bpd_prior': 'prior',
  'eval/bpd_decoder': 'decoder',
}


def describe(scalars: dict[str, float]) -> str:
  """``confident 0.894, FD 11.8, ...``: evaluation scalars for the console."""
  return ', '.join(f'{_NAMES.get(k, k.removeprefix("eval/"))} {v:.4g}' for k, v in scalars.items())


def first_examples(split: str, num_examples: int | None) -> str:
  """``split`` cut to its first ``num_examples`` examples (all of it if None), as TFDS reads it."""
  return split if num_examples is None else f'{split}[:{num_examples}]'


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """Sample metrics, bits/dim (if computed) and the first samples (if asked for)."""

  metrics: dict[str, Any]
  nll: bound.NllResult | None
  grid: np.ndarray | None  # uint8 [n, H, W, C], the first samples

  def scalars(self) -> dict[str, float]:
    """``eval/<name>`` of every scalar metric, bits/dim included."""
    values = {**self.metrics, **(self.nll.summary() if self.nll else {})}
    return {f'eval/{k}': float(v) for k, v in values.items() if isinstance(v, (int, float))}


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """The evaluators of one eval setting, built once; call it with EMA params."""

  sampler: samples.ChunkedSampler
  num_samples: int
  score: samples.ScoreFn
  reference_split: str
  reference_count: int
  nll_fn: bound.BoundEvaluator | None
  nll_split: str | None
  rng: jax.Array

  def __call__(self, params: Any, *, num_grid: int = 0) -> Evaluation:
    """Sample metrics of ``num_samples`` samples, bits/dim if configured, the first ``num_grid``."""
    chunks = self.sampler.chunks(params, jax.random.fold_in(self.rng, 0), self.num_samples)
    num_chunks = -(-self.num_samples // self.sampler.chunk_size)
    chunks = iter(console.Counted(chunks, f'sampling {self.num_samples} (chunks)', num_chunks))
    grid = None
    if num_grid:  # gathers the whole first chunk once
      grid, chunks = samples.peek_images(chunks, min(num_grid, self.num_samples))
    metrics = self.score(chunks, self.num_samples)
    nll = None if self.nll_fn is None else self.nll_fn(params, jax.random.fold_in(self.rng, 1))
    return Evaluation(metrics=metrics, nll=nll, grid=grid)


def make_score_fn(
  config: ml_collections.ConfigDict,
  workdir: epath.PathLike,
  builder: tfds.core.DatasetBuilder,
  mesh: Mesh,
  *,
  reference_split: str,
  batch_size: int,
) -> samples.ScoreFn:
  """The sample evaluator of ``eval.metrics``, its network and reference statistics loaded (or
  computed once and cached in ``eval.reference_dir``)."""
  ev = config.eval
  if ev.metrics == 'digits':
    return digits.DigitsEvaluator.create(builder, reference_split, cache_dir=ev.reference_dir)
  try:
    params = fid.load_params(ev.inception_path)
  except FileNotFoundError as e:
    raise SetupError(f'config.eval.inception_path: {e}') from None
  path = inception.reference_stats_path(
    ev.reference_dir or epath.Path(workdir) / 'fid_stats',
    config.dataset.name,
    config.dataset.image_size,
    reference_split,
    builder.info.splits[reference_split].num_examples,
  )

  def reference_batches() -> Iterable[input_pipeline.Batch]:
    batches, num_batches = input_pipeline.create_eval_dataset(
      builder, config.dataset, reference_split, batch_size=batch_size
    )
    return console.Counted(batches, f'FID reference of {reference_split} (batches)', num_batches)

  return inception.InceptionEvaluator.create(
    params, mesh, reference_path=path, reference_batches=reference_batches
  )


def build_evaluator(
  config: ml_collections.ConfigDict,
  workdir: epath.PathLike,
  builder: tfds.core.DatasetBuilder,
  model: nn.Module,
  diffusion: diffusion_lib.GaussianDiffusion,
  mesh: Mesh,
  *,
  image_shape: tuple[int, int, int],
  num_samples: int,
  nll_split: str | None,
) -> Evaluator:
  """An Evaluator of ``num_samples`` samples and, unless ``nll_split`` is None, bits/dim on it."""
  validation.check_eval(config)
  validation.check_splits(
    builder, {'eval.reference_split': reference_split(config), 'eval.nll_split': nll_split}
  )
  ev, clip_denoised = config.eval, config.train.clip_denoised
  chunk_size = samples.chunk_size(ev.batch_size, num_samples, mesh.devices.size)
  sample_fn = sampling.make_sample_fn(
    model,
    diffusion,
    mesh,
    image_shape=image_shape,
    num_samples=chunk_size,
    **sampling.sampler_settings(config),
  )
  batch_size = samples.round_up(ev.batch_size, mesh.devices.size)  # the global data batch
  nll_fn = None
  if nll_split is not None:
    bpd_fn = bound.make_bpd_fn(
      functools.partial(models.model_fn, model), diffusion, mesh, clip_denoised=clip_denoised
    )
    nll_batches, num_batches = input_pipeline.create_eval_dataset(
      builder, config.dataset, nll_split, batch_size=batch_size
    )
    nll_batches = console.Counted(nll_batches, f'bits/dim on {nll_split} (batches)', num_batches)
    nll_fn = bound.BoundEvaluator(bpd_fn, nll_batches, mesh)
  return Evaluator(
    sampler=samples.ChunkedSampler(sample_fn, chunk_size),
    num_samples=num_samples,
    score=make_score_fn(
      config, workdir, builder, mesh, reference_split=reference_split(config), batch_size=batch_size
    ),
    reference_split=reference_split(config),
    reference_count=builder.info.splits[reference_split(config)].num_examples,
    nll_fn=nll_fn,
    nll_split=nll_split,
    rng=rngs.key(config.seed, 'eval'),
  )


def make_in_loop_evaluator(
  config: ml_collections.ConfigDict,
  workdir: epath.PathLike,
  builder: tfds.core.DatasetBuilder,
  model: nn.Module,
  diffusion: diffusion_lib.GaussianDiffusion,
  mesh: Mesh,
) -> Callable[[int, Any, metric_writers.MetricWriter], dict[str, float]]:
  """``evaluate(step, ema_params, writer) -> scalars`` for the train loop:
  ``eval.in_loop_num_samples`` samples, bits/dim only if ``eval.nll_num_examples`` is set.
  Loads (or computes) the references now."""
  ev = config.eval
  evaluator = build_evaluator(
    config,
    workdir,
    builder,
    model,
    diffusion,
    mesh,
    image_shape=train_state.StateFactory.from_config(config).image_shape,
    num_samples=ev.in_loop_num_samples,
    nll_split=bound_split(config) if ev.nll_num_examples else None,
  )

  def evaluate(step: int, ema_params: Any, writer: metric_writers.MetricWriter) -> dict[str, float]:
    scalars = evaluator(ema_params).scalars()
    writer.write_scalars(step, scalars)
    return scalars

  return evaluate


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, *, config_name: str | None = None
) -> dict[str, Any]:
  """``--mode=eval``: the latest checkpoint's EMA params -> ``workdir/eval/step_<N>/`` (report.json,
  samples.png, nll_terms.csv, nll_terms.png) and ``eval/*`` scalars; returns the report."""
  validation.check_eval(config)
  builder = input_pipeline.get_builder(config.dataset)
  validation.check_splits(
    builder,
    {'eval.reference_split': reference_split(config), 'eval.nll_split': bound_split(config)},
  )
  run = sampling.restore_inference(config, workdir)
  ev = config.eval
  evaluator = build_evaluator(
    config,
    run.workdir,
    builder,
    run.model,
    run.diffusion,
    run.mesh,
    image_shape=run.image_shape,
    num_samples=ev.num_samples,
    nll_split=bound_split(config),
  )
  result = evaluator(run.ema_params, num_grid=NUM_GRID_IMAGES)
  report = {
    'config': config_name or config.dataset.name,
    'dataset': config.dataset.name,
    'step': run.step,
    'metrics_kind': ev.metrics,
    'sampler': sampling.sampler_settings(config),
    'num_samples': ev.num_samples,
    'reference_split': evaluator.reference_split,
    'reference_count': evaluator.reference_count,
    'nll_split': evaluator.nll_split,
    'nll_num_examples': result.nll.num_examples if result.nll else 0,
    'metrics': {**result.metrics, **(result.nll.summary() if result.nll else {})},
  }
  if result.nll is None:
    report['nll_skipped'] = (
      f'{config.dataset.name} has no held-out split (dataset.eval_split is None) and '
      'eval.nll_split is not set: no bits/dim (the paper reports none for CelebA-HQ).'
    )
  out_dir = run.workdir / 'eval' / f'step_{run.step}'
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'report.json').write_text(json.dumps(report, indent=2))
    images.save_png(out_dir / 'samples.png', images.image_grid(result.grid))
    for name, data in (bound.nll_files(result.nll) if result.nll else {}).items():
      (out_dir / name).write_bytes(data)
  writer = metric_writers.create_default_writer(run.workdir, just_logging=jax.process_index() > 0)
  writer.write_scalars(run.step, result.scalars())
  writer.flush()
  writer.close()
  console.say('Evaluated step %d: %s', run.step, describe(result.scalars()))
  console.say('  report: %s', out_dir / 'report.json')
  return report
