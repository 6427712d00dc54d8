"""What the sample evaluators (``inception``, ``digits``) share: their settings' rules, a compiled
sampler drawn in chunks, the chunks gathered to every host, and the evaluator that scores them.

Chunk c is drawn with ``fold_in(rng, c)`` and only the first ``num_samples`` rows are scored, so
the scored samples depend on the key, the chunk size and the device count, not on the metric.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import (
  config_rules,
  console,
  images,
  input_pipeline,
  parallel,
  sampling,
)
from diffusion_jax import run as run_lib
from diffusion_jax.config_rules import Problems
from diffusion_jax.evaluators.base import Program, Result
from diffusion_jax.sampling import ChunkedSampler, chunk_size

# (sample chunks in [-1, 1], how many of their rows to score) -> named metrics; scalars are
# written as eval/<name>, anything else (e.g. a histogram) goes to the report only.
ScoreFn = Callable[[Iterable[jax.Array], int], dict[str, Any]]
GRID_SIZE = 64  # the samples --mode=eval shows (samples.png)


def reference_split(settings: ml_collections.ConfigDict) -> str:
  """The real images of a sample evaluator: ``reference_split`` cut to
  ``reference_num_examples``."""
  return input_pipeline.first_examples(settings.reference_split, settings.reference_num_examples)


def problems(name: str, settings: ml_collections.ConfigDict, *, minimum: int) -> Problems:
  """The shared settings' rules; a metric needs at least ``minimum`` samples."""
  field = f'evals.{name}'
  found = config_rules.evaluator_range_problems(
    name,
    settings,
    [
      ('num_samples', 'count', 'the number of samples --mode=eval scores'),
      ('in_loop_num_samples', 'count', 'the samples an in-loop evaluation scores'),
      ('batch_size', 'count', 'the global samples per sampling call'),
      ('reference_num_examples', 'optional count', 'the reference images (None: all)'),
    ],
  )
  for count in ('num_samples', 'in_loop_num_samples'):
    value = settings.get(count)
    if f'{field}.{count}' not in found and config_rules.is_int(value) and value < minimum:
      found[f'{field}.{count}'] = (
        f'{field}.{count}={value} is too small: {settings.type} metrics need at least {minimum} '
        f'samples; set --config.{field}.{count}={minimum} or more.'
      )
  if not isinstance(settings.get('reference_split'), str):
    found[f'{field}.reference_split'] = (
      f'{field}.reference_split={settings.get("reference_split")!r} must name a split of the data '
      f'set; set --config.{field}.reference_split=train.'
    )
  return found


def gathered_rows(chunks: Iterable[Any], num_rows: int) -> Iterator[Any]:
  """Each chunk (a pytree of global arrays with a leading row axis) as numpy on every host,
  trimmed so that exactly the first ``num_rows`` rows come out; stops pulling chunks after that."""
  remaining = num_rows
  for chunk in chunks:
    rows = jax.tree.map(lambda x, n=remaining: parallel.gather(x)[:n], chunk)
    remaining -= len(jax.tree.leaves(rows)[0])
    yield rows
    if remaining <= 0:
      return


def peek_images(
  chunks: Iterator[jax.Array], num_images: int
) -> tuple[np.ndarray, Iterator[jax.Array]]:
  """The first chunk's first ``num_images`` as uint8 on every host, and all chunks, unchanged."""
  first = next(chunks)
  return sampling.gather_images(first, num_images), itertools.chain([first], chunks)


@dataclasses.dataclass(frozen=True)
class SampleEvaluator:
  """``score`` of ``num_samples`` EMA samples against the reference (named in the details);
  with ``grid_size``, their first images too."""

  sampler: ChunkedSampler
  num_samples: int
  score: ScoreFn
  grid_size: int
  reference: dict[str, Any]

  def __call__(self, params: Any, rng: jax.Array) -> Result:
    chunks = self.sampler.chunks(params, rng, self.num_samples)
    num_chunks = -(-self.num_samples // self.sampler.chunk_size)
    chunks = iter(console.Counted(chunks, f'sampling {self.num_samples} (chunks)', num_chunks))
    files = {}
    if self.grid_size:  # gathers the whole first chunk once
      grid, chunks = peek_images(chunks, min(self.grid_size, self.num_samples))
      files['samples.png'] = images.png_bytes(images.image_grid(grid))
    values = self.score(chunks, self.num_samples)
    scalars = {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
    details = {k: v for k, v in values.items() if k not in scalars}
    return Result(scalars, {'num_samples': self.num_samples, **self.reference, **details}, files)


def create(
  settings: ml_collections.ConfigDict, run: run_lib.Run, score: ScoreFn, *, in_loop: bool
) -> SampleEvaluator:
  """The evaluator of ``settings``: ``in_loop_num_samples`` in the loop (no grid), else
  ``num_samples`` and a grid of the first ``GRID_SIZE``."""
  num_samples = settings.in_loop_num_samples if in_loop else settings.num_samples
  size = chunk_size(settings.batch_size, num_samples, run.mesh.devices.size)
  sampler = run.chunked_sampler(num_samples, size)
  split = reference_split(settings)
  reference = {
    'reference_split': split,
    'reference_count': run.builder.info.splits[split].num_examples,
  }
  return SampleEvaluator(sampler, num_samples, score, 0 if in_loop else GRID_SIZE, reference)


def programs(settings: ml_collections.ConfigDict, run: run_lib.Run) -> dict[str, Program]:
  """The sampler of ``settings``' chunks (--mode=eval's, the larger), with abstract arguments."""
  size = chunk_size(settings.batch_size, settings.num_samples, run.mesh.devices.size)
  first_row = jax.ShapeDtypeStruct((), jnp.int32)
  args = (run.abstract_state().ema_params, run.abstract_key(), first_row)
  return {'sampler': (run.sample_fn(size), args)}


def chunk_shape(settings: ml_collections.ConfigDict, run: run_lib.Run) -> tuple[int, ...]:
  """The shape of one chunk of samples [chunk, H, W, C]."""
  size = chunk_size(settings.batch_size, settings.num_samples, run.mesh.devices.size)
  return (size, *run.image_shape)
